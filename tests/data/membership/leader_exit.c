/* The thread-group leader leaves early (SYS_exit, not exit_group); the
 * other thread waits until the leader is a zombie, then connects to
 * ADDR:PORT and exits the group with 0 (connected) or 3 (refused).
 * usage: leader_exit ADDR PORT
 *   gcc -O1 -pthread -o leader_exit leader_exit.c */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

static const char *addr;
static int port;
static pid_t leader;

static int leader_gone(void)
{
	char path[64], s[512];
	snprintf(path, sizeof(path), "/proc/self/task/%d/stat", (int)leader);
	FILE *f = fopen(path, "r");
	if (!f)
		return 1;
	size_t n = fread(s, 1, sizeof(s) - 1, f);
	fclose(f);
	s[n] = 0;
	char *r = strrchr(s, ')');
	return r && r[1] && (r[2] == 'Z' || r[2] == 'X');
}

static void *worker(void *unused)
{
	(void)unused;
	/* wait on the condition (bounded: 30 s), not for a while */
	for (int i = 0; i < 30000 && !leader_gone(); i++)
		usleep(1000);
	printf("leader gone %d\n", leader_gone());
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in sa;
	memset(&sa, 0, sizeof(sa));
	sa.sin_family = AF_INET;
	sa.sin_port = htons(port);
	inet_pton(AF_INET, addr, &sa.sin_addr);
	int rc = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
	printf("connect %d errno %d\n", rc, rc ? errno : 0);
	fflush(stdout);
	_exit(rc == 0 ? 0 : 3);
}

int main(int argc, char **argv)
{
	if (argc < 3)
		return 2;
	addr = argv[1];
	port = atoi(argv[2]);
	leader = getpid();
	pthread_t t;
	if (pthread_create(&t, NULL, worker, NULL))
		return 2;
	syscall(SYS_exit, 0);
	return 0;
}
