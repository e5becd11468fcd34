/* execve through the 32-bit `int 0x80` entry of a 64-bit process: no
 * syscalls:* tracepoint sees it (IA32 emulation), only sched_process_exec.
 * usage: exec32 PATH ARGV0 [ARG...]   (environment: empty)
 *        exec32 PATH @FILE             argv from FILE, one argument a line
 *                                      (so that exec32's own argv shows none) 
 * Build static and not position-independent, so that the copies below sit
 * at addresses that fit the 32-bit ABI's pointers:
 *   gcc -static -no-pie -O1 -o exec32 exec32.c */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

static char buf[16384];
static uint32_t argv32[64];
static uint32_t envp32[1];

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: %s PATH ARGV0 [ARG...]\n", argv[0]);
		return 2;
	}
	char *p = buf, *end = buf + sizeof(buf);
	int n = 0;
	if (argv[2][0] == '@') {
		size_t len = strlen(argv[1]) + 1;
		if (len > 4096)
			return 2;
		memcpy(p, argv[1], len);
		p += len;
		FILE *f = fopen(argv[2] + 1, "r");
		if (!f)
			return 2;
		char line[4096];
		while (n < 63 && fgets(line, sizeof(line), f)) {
			len = strcspn(line, "\n");
			if (p + len + 1 > end)
				return 2;
			memcpy(p, line, len);
			p[len] = 0;
			argv32[n++] = (uint32_t)(uintptr_t)p;
			p += len + 1;
		}
		fclose(f);
		goto run;
	}
	for (int i = 1; i < argc && n < 63; i++) {
		size_t len = strlen(argv[i]) + 1;
		if (p + len > end)
			return 2;
		memcpy(p, argv[i], len);
		if (i > 1)
			argv32[n++] = (uint32_t)(uintptr_t)p;
		p += len;
	}
run:
	argv32[n] = 0;
	envp32[0] = 0;
	long ret;
	/* i386 __NR_execve = 11: ebx filename, ecx argv, edx envp */
	__asm__ volatile("int $0x80"
			 : "=a"(ret)
			 : "a"(11L), "b"((uint32_t)(uintptr_t)buf), "c"((uint32_t)(uintptr_t)argv32),
			   "d"((uint32_t)(uintptr_t)envp32)
			 : "memory");
	fprintf(stderr, "int 0x80 execve failed: %ld\n", ret);
	return 1;
}
