/* forkexec N PATH: N times fork + execv(PATH) + wait (the fork+exec workload). */
#include "common.h"
#include <sys/wait.h>

int main(int argc, char **argv)
{
	long n = arg_long(argc, argv, 1, "N PATH");
	if (argc < 3)
		return 2;
	char *const args[] = {argv[2], NULL};
	for (long i = 0; i < n; i++) {
		pid_t p = fork();
		if (p < 0) {
			perror("fork");
			return 1;
		}
		if (p == 0) {
			execv(argv[2], args);
			_exit(127);
		}
		int st;
		if (waitpid(p, &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
			fprintf(stderr, "forkexec: child %ld failed\n", i);
			return 1;
		}
	}
	return 0;
}
