/* gateprobe N STAMP: N times fork + execv(STAMP); STAMP writes the
 * CLOCK_MONOTONIC time of its first instruction in main() to a pipe.
 * Prints "pid t_before_exec_ns t_main_ns" per run. With the kernel's exec
 * event time (ktime) of the same pid, t_main - ktime is how long the new
 * image was held by the exec gate. */
#include "common.h"
#include <sys/wait.h>

int main(int argc, char **argv)
{
	long n = arg_long(argc, argv, 1, "N STAMP");
	if (argc < 3)
		return 2;
	for (long i = 0; i < n; i++) {
		int fds[2];
		if (pipe(fds))
			return 1;
		int64_t t0 = mono_ns();
		pid_t p = fork();
		if (p == 0) {
			char fd[16];
			snprintf(fd, sizeof(fd), "%d", fds[1]);
			close(fds[0]);
			char *const args[] = {argv[2], fd, NULL};
			execv(argv[2], args);
			_exit(127);
		}
		close(fds[1]);
		int64_t t1 = 0;
		ssize_t r = read(fds[0], &t1, sizeof(t1));
		close(fds[0]);
		int st;
		waitpid(p, &st, 0);
		if (r == sizeof(t1))
			printf("%d %lld %lld\n", p, (long long)t0, (long long)t1);
		fflush(stdout);
		sleep_ns(5000000);
	}
	return 0;
}
