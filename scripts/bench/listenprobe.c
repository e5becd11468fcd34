/* listenprobe N INTERVAL_MS PORT_BASE: N times bind 0.0.0.0:PORT (first free
 * port from PORT_BASE up) and listen(); prints "port t_ns" with the
 * CLOCK_MONOTONIC time just before listen(). A listener on a non-loopback
 * address in an episode is an alert of the default packs
 * (listener-in-episode): the benchmark's alert-latency probe. */
#include "common.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

int main(int argc, char **argv)
{
	long n = arg_long(argc, argv, 1, "N INTERVAL_MS PORT_BASE");
	long interval = arg_long(argc, argv, 2, "N INTERVAL_MS PORT_BASE");
	long port = arg_long(argc, argv, 3, "N INTERVAL_MS PORT_BASE");
	for (long i = 0; i < n; i++) {
		int s = socket(AF_INET, SOCK_STREAM, 0);
		struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_ANY)};
		for (;; port++) {
			if (port > 65000) {
				fprintf(stderr, "listenprobe: no free port\n");
				return 1;
			}
			a.sin_port = htons(port);
			if (bind(s, (struct sockaddr *)&a, sizeof(a)) == 0)
				break;
		}
		int64_t t = mono_ns();
		if (listen(s, 1)) {
			perror("listen");
			return 1;
		}
		printf("%ld %lld\n", port, (long long)t);
		fflush(stdout);
		port++;
		sleep_ns(interval * 1000000LL);
		close(s);
	}
	return 0;
}
