/* connprobe ADDR PORT N: N times socket + connect(ADDR:PORT) + close; prints
 * "duration_ns errno" of each connect() (the denied-connect latency probe). */
#include "common.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: %s ADDR PORT N\n", argv[0]);
		return 2;
	}
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
	if (inet_pton(AF_INET, argv[1], &a.sin_addr) != 1)
		return 2;
	long n = strtol(argv[3], NULL, 10);
	for (long i = 0; i < n; i++) {
		int s = socket(AF_INET, SOCK_STREAM, 0);
		int64_t t0 = mono_ns();
		int r = connect(s, (struct sockaddr *)&a, sizeof(a));
		int64_t t1 = mono_ns();
		printf("%lld %d\n", (long long)(t1 - t0), r == 0 ? 0 : errno);
		close(s);
		sleep_ns(2000000);
	}
	return 0;
}
