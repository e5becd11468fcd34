/* loadgen RATE SECONDS [open]: socket() calls at RATE per second for SECONDS
 * (each socket() is one tracer event, also a failed one). By default the
 * call fails at once (family -1: EAFNOSUPPORT), so one syscall is one event
 * and one producer reaches several hundred thousand events/s; "open" makes
 * real sockets (socket + close). Prints "produced elapsed_s". RATE 0: as
 * fast as possible. */
#include "common.h"
#include <sys/socket.h>

int main(int argc, char **argv)
{
	double rate = (double)arg_long(argc, argv, 1, "RATE SECONDS");
	double secs = strtod(argc > 2 ? argv[2] : "1", NULL);
	int open_real = argc > 3 && strcmp(argv[3], "open") == 0;
	int64_t start = mono_ns(), end = start + (int64_t)(secs * 1e9), now = start;
	long produced = 0;
	while (now < end) {
		long due = rate > 0 ? (long)((now - start) * rate / 1e9) + 1 : produced + 256;
		while (produced < due) {
			int s = socket(open_real ? AF_UNIX : -1, SOCK_DGRAM, 0);
			if (s >= 0)
				close(s);
			produced++;
		}
		now = mono_ns();
		if (rate > 0) {
			int64_t next = start + (int64_t)((produced + 1) * 1e9 / rate);
			if (next - now > 50000)
				sleep_ns(next - now);
			now = mono_ns();
		}
	}
	printf("%ld %.6f\n", produced, (mono_ns() - start) / 1e9);
	return 0;
}
