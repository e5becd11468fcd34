/* agent-tracer sockets: connect, bind, socket, listen, memfd_create records (syscall
 * enter stashes the arguments, exit emits with the result).
 * Included by tracer.c only (one compilation unit for bcc). */
#ifndef AT_SOCKETS_H
#define AT_SOCKETS_H

/* -------------------------------------------------------------- sockets */

static __always_inline int stash(u64 uaddr, s32 fd, u32 addrlen, s32 a2, s32 a3)
{
	u64 id = bpf_get_current_pid_tgid();
	if (!in_scope(id >> 32))
		return 0;
	u32 tid = (u32)id;
	struct sock_args sa = {.uaddr = uaddr, .fd = fd, .addrlen = addrlen, .a2 = a2, .a3 = a3};
	if (sock_pending.update(&tid, &sa))
		count(AT_CNT_MAP_FULL);   /* a unix connect without its stash is refused (nodesvc.h) */
	return 0;
}

static __always_inline struct sock_args *unstash(void)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	return sock_pending.lookup(&tid);
}

static __always_inline void unstash_done(void)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	sock_pending.delete(&tid);
}

static __always_inline int emit_sock(u32 kind, long ret)
{
	struct sock_args *sa = unstash();
	if (!sa)
		return 0;
	if (kind == AT_EV_BIND && ret == 0)
		unix_bound(sa->uaddr, sa->addrlen);   /* nodesvc.h: the episode owns this path */
	struct sock_event *e = events.ringbuf_reserve(sizeof(struct sock_event));
	if (!e) {
		count_lost(kind);
		unstash_done();
		return 0;
	}
	fill_hdr(&e->h, kind);
	e->fd = sa->fd;
	e->result = (s32)ret;
	u32 len = sa->addrlen;
	if (len > AT_SOCKADDR_LEN)
		len = AT_SOCKADDR_LEN;
	e->addrlen = len;
	if (bpf_probe_read_user(e->addr, AT_SOCKADDR_LEN, (void *)sa->uaddr))
		__builtin_memset(e->addr, 0, AT_SOCKADDR_LEN);
	if (kind == AT_EV_BIND && ret == 0) {
		u64 key = ((u64)e->h.pid << 32) | (u32)sa->fd;
		u32 zero = 0;
		struct bound_addr *b = sock_scratch.lookup(&zero);
		if (b) {
			b->addrlen = len;
			bpf_probe_read_kernel(b->addr, AT_SOCKADDR_LEN, e->addr);
			bound_fds.update(&key, b);
		}
	}
	events.ringbuf_submit(e, 0);
	unstash_done();
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
	stash((u64)args->uservaddr, args->fd, args->addrlen, 0, 0);
	unix_gate_enter((u64)args->uservaddr, args->addrlen);   /* nodesvc.h */
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
	return emit_sock(AT_EV_CONNECT, args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_bind)
{
	return stash((u64)args->umyaddr, args->fd, args->addrlen, 0, 0);
}

TRACEPOINT_PROBE(syscalls, sys_exit_bind)
{
	return emit_sock(AT_EV_BIND, args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_socket)
{
	return stash((u64)args->family, 0, 0, args->type, args->protocol);
}

TRACEPOINT_PROBE(syscalls, sys_exit_socket)
{
	struct sock_args *sa = unstash();
	if (!sa)
		return 0;
	s32 family = (s32)sa->uaddr, type = sa->a2, proto = sa->a3;
	unstash_done();
	RESERVE(e, struct socket_event, AT_EV_SOCKET);
	e->family = family;
	e->type = type;
	e->protocol = proto;
	e->result = (s32)args->ret;
	events.ringbuf_submit(e, 0);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_listen)
{
	return stash(0, args->fd, 0, args->backlog, 0);
}

TRACEPOINT_PROBE(syscalls, sys_exit_listen)
{
	struct sock_args *sa = unstash();
	if (!sa)
		return 0;
	s32 fd = sa->fd, backlog = sa->a2;
	unstash_done();
	RESERVE(e, struct listen_event, AT_EV_LISTEN);
	e->fd = fd;
	e->backlog = backlog;
	e->result = (s32)args->ret;
	u64 key = ((u64)e->h.pid << 32) | (u32)fd;
	struct bound_addr *b = bound_fds.lookup(&key);
	if (b) {
		e->addrlen = b->addrlen;
		bpf_probe_read_kernel(e->addr, AT_SOCKADDR_LEN, b->addr);
	} else {
		e->addrlen = 0;
	}
	events.ringbuf_submit(e, 0);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_memfd_create)
{
	return stash((u64)args->uname, 0, 0, args->flags, 0);
}

TRACEPOINT_PROBE(syscalls, sys_exit_memfd_create)
{
	struct sock_args *sa = unstash();
	if (!sa)
		return 0;
	u64 uname = sa->uaddr;
	u32 flags = sa->a2;
	unstash_done();
	RESERVE(e, struct memfd_event, AT_EV_MEMFD);
	e->flags = flags;
	e->result = (s32)args->ret;
	bpf_probe_read_user_str(e->name, AT_MEMFD_NAME_LEN, (void *)uname);
	events.ringbuf_submit(e, 0);
	return 0;
}

#endif
