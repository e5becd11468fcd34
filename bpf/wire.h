/* agent-tracer wire: first bytes written on a new outbound TCP connection of an
 * in-scope process, dispatched from raw_syscalls:sys_enter.
 * Included by tracer.c only (one compilation unit for bcc). */
#ifndef AT_WIRE_H
#define AT_WIRE_H

/* ------------------------------------------- first bytes on the wire */

/* prefixes worth holding the writer for: "SSH-", '{' (JSON-RPC: Stratum),
 * a TLS handshake record (SNI) */
static __always_inline int wire_candidate(const u8 *d, u32 n)
{
	if (n >= 4 && d[0] == 'S' && d[1] == 'S' && d[2] == 'H' && d[3] == '-')
		return 1;
	if (n >= 1 && d[0] == '{')
		return 1;
	if (n >= 3 && d[0] == 0x16 && d[1] == 0x03)
		return 1;
	return 0;
}

static __always_inline int on_wire_write(s32 fd, const void *buf, u64 len, u32 call)
{
	u64 id = bpf_get_current_pid_tgid();
	u64 key = (id & 0xffffffff00000000ULL) | (u32)fd;
	/* the scope check: only in-scope processes have entries */
	struct wire_conn *wc = wire_fds.lookup(&key);
	if (!wc || wc->state != AT_WIRE_CONNECTED)
		return 0;
	u16 family = wc->family, port = wc->port;
	u8 addr[16];
	__builtin_memcpy(addr, wc->addr, 16);
	wire_fds.delete(&key);
	struct wire_event *e = events.ringbuf_reserve(sizeof(struct wire_event));
	if (!e) {
		count_lost(AT_EV_PROTOCOL);
		return 0;
	}
	fill_hdr(&e->h, AT_EV_PROTOCOL);
	e->fd = fd;
	e->call = call;
	e->len = len;
	e->flags = 0;
	e->family = family;
	e->port = port;
	e->_pad = 0;
	__builtin_memcpy(e->addr, addr, 16);
	u32 n = len > AT_WIRE_CAP ? AT_WIRE_CAP : (u32)len;
	if (n && bpf_probe_read_user(e->data, n & (2 * AT_WIRE_CAP - 1), buf))
		n = 0;
	e->captured = n;
	u32 gen = (u32)cfg(AT_CFG_GEN) & 1;
	if ((cfg(AT_CFG_WIRE_HOLD) & (1ULL << gen)) && wire_candidate(e->data, n)) {
		/* the write itself completes; the process stops before its next
		 * instruction, so the peer gets nothing beyond these bytes until
		 * user space has ruled (same map and guarantees as the exec gate) */
		u32 tgid = id >> 32, held = 1;
		gated.update(&tgid, &held);
		bpf_send_signal(AT_SIGSTOP);
		count(AT_CNT_WIRE_HELD);
		e->flags |= AT_WIRE_HELD;
	}
	events.ringbuf_submit(e, 0);
	return 0;
}

/* the head of struct msghdr as the sendmsg(2) ABI passes it (user space's
 * layout, not a kernel-internal struct) */
struct at_msghdr {
	void *msg_name;
	int msg_namelen;
	const struct iovec *msg_iov;
	u64 msg_iovlen;
};

/* the first iovec of writev / sendmsg */
static __always_inline int on_wire_iov(s32 fd, const struct iovec *iov, u32 call)
{
	struct iovec v = {};
	if (!iov || bpf_probe_read_user(&v, sizeof(v), iov))
		return 0;
	return on_wire_write(fd, v.iov_base, v.iov_len, call);
}

/* The write paths are dispatched from raw_syscalls:sys_enter (below), which
 * the tracer attaches anyway: one tracepoint for every syscall instead of
 * five more. A write outside every episode costs a few compares and one
 * hash lookup that misses. */
static __always_inline int wire_syscall(long nr, const unsigned long *a)
{
	if (nr != __NR_write && nr != __NR_sendto && nr != __NR_writev && nr != __NR_sendmsg &&
	    nr != __NR_close)
		return 0;
	s32 fd = (s32)a[0];
	u64 key = (bpf_get_current_pid_tgid() & 0xffffffff00000000ULL) | (u32)fd;
	/* the scope check: only in-scope processes have entries */
	if (!wire_fds.lookup(&key))
		return 0;
	if (nr == __NR_close) {
		wire_fds.delete(&key);
		return 0;
	}
	if (nr == __NR_write)
		return on_wire_write(fd, (const void *)a[1], a[2], AT_WIRE_WRITE);
	if (nr == __NR_sendto)
		return on_wire_write(fd, (const void *)a[1], a[2], AT_WIRE_SENDTO);
	if (nr == __NR_writev)
		return on_wire_iov(fd, (const struct iovec *)a[1], AT_WIRE_WRITEV);
	struct at_msghdr m = {};
	if (bpf_probe_read_user(&m, sizeof(m), (void *)a[1]))
		return 0;
	return on_wire_iov(fd, m.msg_iov, AT_WIRE_SENDMSG);
}

TRACEPOINT_PROBE(raw_syscalls, sys_enter)
{
	unsigned long a[3] = {args->args[0], args->args[1], args->args[2]};
	wire_syscall(args->id, a);
	/* only does work after a SIGCONT race was seen (sticky, one array read
	 * otherwise): the continued process is stopped again at its first syscall */
	if (!cfg(AT_CFG_RACE_ARMED))
		return 0;
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	u32 *g = gated.lookup(&tgid);
	if (!g || *g != 2)
		return 0;
	u32 held = 1;
	gated.update(&tgid, &held);
	bpf_send_signal(AT_SIGSTOP);
	return 0;
}

#endif
