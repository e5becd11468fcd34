/* A 32-bit Stratum client that enters the kernel through int 0x80 only (no
 * libc: builds with gcc -m32 -nostdlib and no 32-bit libc installed): socket,
 * connect, write one mining.subscribe line, read, exit. The 32-bit entry
 * skips the syscalls:* tracepoints; the packet path sees its bytes anyway.
 * Built by tests/test_wire_live.py with -DA0..A3 (IPv4) and -DPORT. */
static long sc(long n, long a, long b, long c)
{
	long r;
	__asm__ volatile("int $0x80" : "=a"(r) : "a"(n), "b"(a), "c"(b), "d"(c) : "memory");
	return r;
}

struct sin {
	unsigned short fam;
	unsigned short port;
	unsigned char addr[4];
	unsigned char zero[8];
};

void _start(void)
{
	struct sin a = {2, (unsigned short)(((PORT) >> 8) | (((PORT) & 0xff) << 8)), {A0, A1, A2, A3}, {0}};
	static const char m[] = "{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[\"m32/1.0\"]}\n";
	static char buf[256];
	long s = sc(359 /* socket */, 2, 1, 0);
	if (s < 0 || sc(362 /* connect */, s, (long)&a, sizeof(a)) < 0)
		sc(1 /* exit */, 2, 0, 0);
	sc(4 /* write */, s, (long)m, sizeof(m) - 1);
	sc(3 /* read */, s, (long)buf, sizeof(buf));
	sc(1 /* exit */, 0, 0, 0);
}
