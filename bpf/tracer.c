/* agent-tracer kernel side, compiled by bcc at start.
 *
 * Tracepoints and cgroup sock_addr programs only; the only structs read are
 * tracepoint fields, helper results and uapi sockaddrs (design.md).
 *
 * Settings come from the loader as -D flags:
 *   AT_SCOPE_ALL      1: every process emits; 0: only processes in an episode
 *   AT_EPISODE_LEVEL  cgroup level of <cgroup2>/agent-tracer/<ID> (0: off)
 *   AT_RINGBUF_PAGES  ring buffer size in pages (power of two)
 *   AT_ENV_MARKER     1: look for AGENT_EPISODE_ID= in envp at execve
 */
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>
#include <linux/socket.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/un.h>
#include <linux/uio.h>
#include <asm/unistd.h>
#include "events.h"

#ifndef AT_SCOPE_ALL
#define AT_SCOPE_ALL 0
#endif
#ifndef AT_EPISODE_LEVEL
#define AT_EPISODE_LEVEL 0
#endif
#ifndef AT_RINGBUF_PAGES
#define AT_RINGBUF_PAGES 2048
#endif
#ifndef AT_ENV_MARKER
#define AT_ENV_MARKER 1
#endif
#define AT_ENV_SCAN_MAX 96
#define AT_SIGSTOP 19
#define AT_SIGKILL 9
#define AT_SIGCONT 18
#define AT_CLONE_THREAD 0x00010000

BPF_RINGBUF_OUTPUT(events, AT_RINGBUF_PAGES);
BPF_PERCPU_ARRAY(lost, u64, AT_EV_KIND_MAX);
BPF_PERCPU_ARRAY(counters, u64, AT_CNT_MAX);
BPF_ARRAY(config, u64, AT_CFG_MAX);

/* scope: episode cgroups (id -> episode slot) and tracked processes
 * (tgid -> source | slot << 8) */
BPF_HASH(episode_cgroups, u64, u32, 16384);
BPF_HASH(tracked, u32, u32, 65536);

/* in-flight syscalls of in-scope threads */
BPF_HASH(exec_pending, u32, struct exec_event, 1024);
BPF_PERCPU_ARRAY(exec_scratch, struct exec_event, 1);
struct sock_args {
	u64 uaddr;
	s32 fd;
	u32 addrlen;
	s32 a2;   /* socket: type, listen: backlog, memfd: flags */
	s32 a3;   /* socket: protocol */
};
BPF_HASH(sock_pending, u32, struct sock_args, 8192);
BPF_HASH(thread_clones, u32, u8, 8192);
struct bound_addr {
	u32 addrlen;
	u8 addr[AT_SOCKADDR_LEN];
};
BPF_TABLE("lru_hash", u64, struct bound_addr, bound_fds, 16384);
struct exit_info {
	s32 code;
	s32 signal;
};
BPF_HASH(exit_info, u32, struct exit_info, 65536);
BPF_PERCPU_ARRAY(sock_scratch, struct bound_addr, 1);
/* TCP sockets of in-scope processes, (tgid << 32 | fd) -> state: created by
 * socket(), then connected outbound; the first write on a connected one is
 * captured and the entry forgotten (close() forgets it too). Only in-scope
 * processes ever have entries, so for the rest of the node a write costs one
 * hash lookup that misses. */
#define AT_WIRE_SOCKET 1
#define AT_WIRE_CONNECTED 2
struct wire_conn {
	u32 state;
	u16 family;
	u16 port;
	u8 addr[16];
};
BPF_TABLE("lru_hash", u64, struct wire_conn, wire_fds, 16384);

/* enforcement maps, double-buffered by generation */
BPF_HASH(kill_comms, struct comm_key, u8, 4096);   /* value: 1 episodes, 2 all */
BPF_HASH(gate_comms, struct comm_key, u8, 4096);
BPF_HASH(gated, u32, u32, 4096);                   /* 1 held, 2 continued by someone else */
/* the tracer's own process tree (tgids): never gated outside episodes, so the
 * tracer cannot wait on a child that waits on the tracer. User space puts
 * its tgid here; children are added at clone, removed at exit. */
BPF_HASH(self_tree, u32, u8, 4096);
BPF_HASH(slot_mask, u32, u64, 32768);              /* gen<<16|slot -> deny rule mask */
BPF_LPM_TRIE(deny4, struct lpm4_key, u64, 8192);
BPF_LPM_TRIE(deny6, struct lpm6_key, u64, 8192);
BPF_LPM_TRIE(exc4, struct lpm4_key, u64, 8192);
BPF_LPM_TRIE(exc6, struct lpm6_key, u64, 8192);
BPF_HASH(deny_port, u32, u64, 65536);              /* gen<<16|port -> mask */
BPF_HASH(exc_port, u32, u64, 65536);
BPF_ARRAY(gpu_prefixes, struct gpu_prefix, AT_GPU_PREFIX_MAX);

static __always_inline u64 cfg(u32 idx)
{
	u64 *v = config.lookup(&idx);
	return v ? *v : 0;
}

static __always_inline void count(u32 idx)
{
	u64 *v = counters.lookup(&idx);
	if (v)
		(*v)++;
}

static __always_inline void count_lost(u32 kind)
{
	u64 *v = lost.lookup(&kind);
	if (v)
		(*v)++;
}

/* slot of the episode cgroup the current task is in, or -1 */
static __always_inline int cgroup_slot(void)
{
	u64 cg = bpf_get_current_cgroup_id();
	u32 *slot = episode_cgroups.lookup(&cg);
	if (slot)
		return *slot;
#if AT_EPISODE_LEVEL > 0
	/* nested cgroups below an episode cgroup belong to it */
	cg = bpf_get_current_ancestor_cgroup_id(AT_EPISODE_LEVEL);
	if (cg) {
		slot = episode_cgroups.lookup(&cg);
		if (slot)
			return *slot;
	}
	/* any cgroup below <cgroup2>/agent-tracer is an episode, registered or
	 * not yet: slot 0 carries the rules that apply to every episode */
	u64 root = cfg(AT_CFG_EPISODE_ROOT);
	if (root && cg != root && bpf_get_current_ancestor_cgroup_id(AT_EPISODE_LEVEL - 1) == root)
		return 0;
#endif
	return -1;
}

static __always_inline int in_episode(u32 tgid)
{
	if (cgroup_slot() >= 0)
		return 1;
	return tracked.lookup(&tgid) != 0;
}

static __always_inline int in_scope(u32 tgid)
{
	if (AT_SCOPE_ALL)
		return 1;
	return in_episode(tgid);
}

static __always_inline void fill_hdr(struct event_hdr *h, u32 kind)
{
	u64 id = bpf_get_current_pid_tgid();
	h->ktime = bpf_ktime_get_ns();
	h->cgroup_id = bpf_get_current_cgroup_id();
	h->kind = kind;
	h->pid = id >> 32;
	h->tid = (u32)id;
	h->uid = (u32)bpf_get_current_uid_gid();
	bpf_get_current_comm(h->comm, sizeof(h->comm));
}

/* reserve a record and fill its header; counts the loss when the ring
 * buffer is full (loss is never silent) */
static __always_inline void *reserve(u32 size, u32 kind)
{
	struct event_hdr *h = events.ringbuf_reserve(size);
	if (!h) {
		count_lost(kind);
		return 0;
	}
	fill_hdr(h, kind);
	return h;
}

#define RESERVE(var, type, kind_)                                   \
	type *var = reserve(sizeof(type), kind_);                   \
	if (!var)                                                   \
		return 0;

/* ------------------------------------------------------------ processes */

TRACEPOINT_PROBE(task, task_newtask)
{
	/* runs in the parent: remember thread clones so the fork event and the
	 * lineage below are only for new processes */
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (!(args->clone_flags & AT_CLONE_THREAD)) {
		if (self_tree.lookup(&tgid)) {
			u32 child = args->pid;
			u8 one = 1;
			self_tree.update(&child, &one);
		}
		return 0;
	}
	if (!in_scope(tgid))
		return 0;
	u32 child = args->pid;
	u8 one = 1;
	thread_clones.update(&child, &one);
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_fork)
{
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	u32 child = args->child_pid;
	if (!in_scope(tgid))
		return 0;
	if (thread_clones.lookup(&child)) {
		thread_clones.delete(&child);
		return 0;
	}
	/* lineage: the child of an episode process belongs to the episode, also
	 * after setsid, double fork or reparenting */
	u32 *src = tracked.lookup(&tgid);
	if (src) {
		u32 v = (*src & ~0xffu) | AT_TRACK_LINEAGE;
		tracked.update(&child, &v);
	} else if (!AT_SCOPE_ALL || cgroup_slot() >= 0) {
		int slot = cgroup_slot();
		if (slot >= 0) {
			u32 v = ((u32)slot << 8) | AT_TRACK_LINEAGE;
			tracked.update(&child, &v);
		}
	}
	RESERVE(e, struct fork_event, AT_EV_FORK);
	e->child_pid = child;
	events.ringbuf_submit(e, 0);
	return 0;
}

static __always_inline int env_marker(const char *const *envp, char *out)
{
#if AT_ENV_MARKER
	/* look for "AGENT_EPISODE_ID=" (17 bytes) at the start of each entry */
	for (int i = 0; i < AT_ENV_SCAN_MAX; i++) {
		const char *p = 0;
		if (bpf_probe_read_user(&p, sizeof(p), &envp[i]) || !p)
			return 0;
		u64 head[3] = {};
		if (bpf_probe_read_user(head, 17, p))
			continue;
		/* little-endian words of "AGENT_EP", "ISODE_ID" and "=" */
		if (head[0] != 0x50455f544e454741ULL || head[1] != 0x44495f45444f5349ULL ||
		    (head[2] & 0xff) != '=')
			continue;
		bpf_probe_read_user_str(out, AT_EPISODE_LEN, p + 17);
		return out[0] != 0;
	}
#endif
	return 0;
}

static __always_inline int on_execve(const char *filename, const char *const *argv,
				     const char *const *envp)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32, tid = (u32)id;
	u32 zero = 0;
	struct exec_event *e = exec_scratch.lookup(&zero);
	if (!e)
		return 0;
	e->flags = 0;
	e->episode[0] = 0;
	int scoped = in_scope(tgid);
	if (env_marker(envp, e->episode)) {
		e->flags |= AT_EXEC_ENV_MARKER;
		if (!tracked.lookup(&tgid)) {
			u32 v = AT_TRACK_ENV;
			tracked.update(&tgid, &v);
		}
		scoped = 1;
	}
	if (!scoped)
		return 0;
	e->argc = 0;
	e->old_pid = tid;
	u32 off = 0;
	int i;
	for (i = 0; i < AT_ARGV_MAX; i++) {
		const char *p = 0;
		if (bpf_probe_read_user(&p, sizeof(p), &argv[i]) || !p)
			break;
		if (off >= AT_ARGV_BUF) {
			e->flags |= AT_EXEC_ARGV_TRUNCATED;
			break;
		}
		long n = bpf_probe_read_user_str(&e->args[off & (AT_ARGV_BUF - 1)], AT_ARG_LEN, p);
		if (n <= 0)
			break;
		if (n == AT_ARG_LEN)
			e->flags |= AT_EXEC_ARGV_TRUNCATED;
		off += n;
		e->argc++;
	}
	if (i == AT_ARGV_MAX) {
		const char *p = 0;
		if (!bpf_probe_read_user(&p, sizeof(p), &argv[i]) && p)
			e->flags |= AT_EXEC_ARGV_TRUNCATED;
	}
	e->args_len = off; /* < AT_ARGV_BUF + AT_ARG_LEN: the buffer has that room */
	exec_pending.update(&tid, e);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_execve)
{
	return on_execve(args->filename, args->argv, args->envp);
}

TRACEPOINT_PROBE(syscalls, sys_enter_execveat)
{
	return on_execve(args->filename, args->argv, args->envp);
}

static __always_inline void exec_failed(void)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	exec_pending.delete(&tid);
}

TRACEPOINT_PROBE(syscalls, sys_exit_execve)
{
	/* only reached when execve failed */
	exec_failed();
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_execveat)
{
	exec_failed();
	return 0;
}

static __always_inline u8 comm_verdict(void *map_lookup_result)
{
	return map_lookup_result ? *(u8 *)map_lookup_result : 0;
}

/* should this exec be stopped for a user-space verdict?
 *   episode process: comm gated (any scope), or gate-all (episodes or global)
 *   other process:   comm gated for scope = "all", or global gate-all
 * The tracer's self-test canaries and (outside episodes) the tracer's own
 * process tree are never gated: the tracer waits on them synchronously. */
static __always_inline int exec_gate(int scoped, u32 tgid, struct comm_key *ck)
{
	u8 gate = comm_verdict(gate_comms.lookup(ck));
	u64 bit = 1ULL << ck->gen;
	int ep = scoped && (AT_SCOPE_ALL ? in_episode(tgid) : 1);
	if (ep) {
		if (gate)
			return 1;
		if (!((cfg(AT_CFG_GATE_ALL) | cfg(AT_CFG_GATE_ALL_GLOBAL)) & bit))
			return 0;
		return cgroup_slot() != AT_SLOT_CANARY;
	}
	if (gate != 2 && !(cfg(AT_CFG_GATE_ALL_GLOBAL) & bit))
		return 0;
	return self_tree.lookup(&tgid) == 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
	u32 old = args->old_pid;
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct exec_event *p = exec_pending.lookup(&old);
	struct comm_key ck = {};
	ck.gen = (u32)cfg(AT_CFG_GEN);
	bpf_get_current_comm(ck.comm, sizeof(ck.comm));
	u8 kill = comm_verdict(kill_comms.lookup(&ck));
	int scoped = p != 0;

	/* known-bad names: killed here, before the new image runs */
	if (kill == 2 || (kill == 1 && scoped && (AT_SCOPE_ALL ? in_episode(tgid) : 1))) {
		bpf_send_signal(AT_SIGKILL);
		count(AT_CNT_EXEC_KILLED);
	} else {
		kill = 0;
	}
	u32 flags = p ? p->flags : AT_EXEC_NO_ARGV;
	if (kill) {
		flags |= AT_EXEC_KILLED;
	} else if (exec_gate(p != 0, tgid, &ck)) {
		u32 held = 1;
		gated.update(&tgid, &held);
		bpf_send_signal(AT_SIGSTOP);
		count(AT_CNT_GATED);
		flags |= AT_EXEC_GATED;
	}
	if (!p) {
		/* out of scope: reported only when killed or gated (scope = "all"
		 * rules); argv was not captured at execve */
		if (!(flags & (AT_EXEC_KILLED | AT_EXEC_GATED)))
			return 0;
		struct exec_event *e = events.ringbuf_reserve(sizeof(struct exec_event));
		if (!e) {
			count_lost(AT_EV_EXEC);
			return 0;
		}
		fill_hdr(&e->h, AT_EV_EXEC);
		e->flags = flags;
		e->argc = 0;
		e->args_len = 0;
		e->old_pid = old;
		e->episode[0] = 0;
		TP_DATA_LOC_READ_STR(e->filename, filename, AT_FILENAME_LEN);
		events.ringbuf_submit(e, 0);
		return 0;
	}

	struct exec_event *e = events.ringbuf_reserve(sizeof(struct exec_event));
	if (!e) {
		count_lost(AT_EV_EXEC);
		exec_pending.delete(&old);
		return 0;
	}
	bpf_probe_read_kernel(e, sizeof(*e), p);
	fill_hdr(&e->h, AT_EV_EXEC);
	e->flags = flags;
	e->old_pid = old;
	TP_DATA_LOC_READ_STR(e->filename, filename, AT_FILENAME_LEN);
	events.ringbuf_submit(e, 0);
	exec_pending.delete(&old);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_exit_group)
{
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (!in_scope(tgid))
		return 0;
	struct exit_info info = {.code = (s32)args->error_code, .signal = 0};
	exit_info.update(&tgid, &info);
	return 0;
}

TRACEPOINT_PROBE(signal, signal_deliver)
{
	/* a fatal signal with the default action is about to end the process */
	if (args->sa_handler != 0)
		return 0;
	int sig = args->sig;
	if (sig == 17 || sig == 18 || sig == 19 || sig == 20 || sig == 21 ||
	    sig == 22 || sig == 23 || sig == 28)
		return 0;
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (!in_scope(tgid))
		return 0;
	/* the first fatal signal is the cause; the group exit that follows may
	 * trace a SIGKILL too */
	struct exit_info *old = exit_info.lookup(&tgid);
	if (old && old->signal)
		return 0;
	struct exit_info info = {.code = -1, .signal = sig};
	exit_info.update(&tgid, &info);
	return 0;
}

TRACEPOINT_PROBE(signal, signal_generate)
{
	/* the exec gate must hold: a SIGCONT to a gated process from anyone but
	 * the tracer (which removes the pid from `gated` first) re-arms it */
	u32 target = args->pid;
	int sig = args->sig;
	if (sig != AT_SIGCONT) {
		/* remember a signal that kills by default: a fatal signal reaches
		 * the victim as SIGKILL (group exit), so this is its real cause */
		if (sig <= 0 || sig == 17 || sig == 19 || sig == 20 || sig == 21 ||
		    sig == 22 || sig == 23 || sig == 28 || sig > 31)
			return 0;
		if (!tracked.lookup(&target) && !in_scope(bpf_get_current_pid_tgid() >> 32))
			return 0;
		struct exit_info info = {.code = -1, .signal = sig};
		exit_info.update(&target, &info);
		return 0;
	}
	u32 *g = gated.lookup(&target);
	if (!g)
		return 0;
	u32 raced = 2;
	gated.update(&target, &raced);
	u32 idx = AT_CFG_RACE_ARMED;
	u64 one = 1;
	config.update(&idx, &one);
	count(AT_CNT_GATE_RACE);
	RESERVE(e, struct gate_race_event, AT_EV_GATE_RACE);
	e->target = target;
	e->sig = args->sig;
	events.ringbuf_submit(e, 0);
	return 0;
}


/* A new episode cgroup (<cgroup2>/agent-tracer/<ID>) is named here, in the
 * ring buffer ahead of anything that runs in it: even a process killed at its
 * first exec, in a cgroup removed before user space could scan for it, is
 * attributed to its episode. Only the cgroup2 hierarchy (root 0) and below
 * its top level: cgroups are made rarely, user space matches the prefix. */
TRACEPOINT_PROBE(cgroup, cgroup_mkdir)
{
	if (args->root != 0 || args->level < 2)
		return 0;
	RESERVE(e, struct cgroup_event, AT_EV_CGROUP_MKDIR);
	e->id = args->id;
	e->level = args->level;
	e->_pad = 0;
	TP_DATA_LOC_READ_STR(e->path, path, AT_CGROUP_PATH_LEN);
	events.ringbuf_submit(e, 0);
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32, tid = (u32)id;
	if (tid != tgid) {
		tracked.delete(&tid);
		return 0;
	}
	int scoped = in_scope(tgid);
	struct exit_info *info = exit_info.lookup(&tgid);
	s32 code = -1, sig = 0;
	if (info) {
		code = info->code;
		sig = info->signal;
		exit_info.delete(&tgid);
	}
	tracked.delete(&tgid);
	gated.delete(&tgid);
	self_tree.delete(&tgid);
	if (!scoped)
		return 0;
	RESERVE(e, struct exit_event, AT_EV_EXIT);
	e->code = code;
	e->signal = sig;
	events.ringbuf_submit(e, 0);
	return 0;
}

/* -------------------------------------------------------------- sockets */

static __always_inline int stash(u64 uaddr, s32 fd, u32 addrlen, s32 a2, s32 a3)
{
	u64 id = bpf_get_current_pid_tgid();
	if (!in_scope(id >> 32))
		return 0;
	u32 tid = (u32)id;
	struct sock_args sa = {.uaddr = uaddr, .fd = fd, .addrlen = addrlen, .a2 = a2, .a3 = a3};
	sock_pending.update(&tid, &sa);
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

/* a TCP socket of ours connected outbound: its first write will be captured */
static __always_inline void wire_connected(struct sock_event *e)
{
	u64 key = ((u64)e->h.pid << 32) | (u32)e->fd;
	struct wire_conn *wc = wire_fds.lookup(&key);
	if (!wc || wc->state != AT_WIRE_SOCKET)
		return;
	u16 fam = e->addr[0] | (e->addr[1] << 8);
	if (fam == AF_INET && e->addrlen >= 8) {
		__builtin_memset(wc->addr, 0, 16);
		__builtin_memcpy(wc->addr, &e->addr[4], 4);
	} else if (fam == AF_INET6 && e->addrlen >= 24) {
		__builtin_memcpy(wc->addr, &e->addr[8], 16);
	} else {
		return;
	}
	wc->family = fam;
	wc->port = (e->addr[2] << 8) | e->addr[3];
	wc->state = AT_WIRE_CONNECTED;
}

static __always_inline int emit_sock(u32 kind, long ret)
{
	struct sock_args *sa = unstash();
	if (!sa)
		return 0;
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
	if (kind == AT_EV_CONNECT && (ret == 0 || ret == -115 /* EINPROGRESS */))
		wire_connected(e);
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
	return stash((u64)args->uservaddr, args->fd, args->addrlen, 0, 0);
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
	if (args->ret >= 0 && (type & 0xf) == 1 /* SOCK_STREAM */ &&
	    (family == AF_INET || family == AF_INET6) && (proto == 0 || proto == IPPROTO_TCP)) {
		u64 key = (bpf_get_current_pid_tgid() & 0xffffffff00000000ULL) | (u32)args->ret;
		struct wire_conn wc = {.state = AT_WIRE_SOCKET};
		wire_fds.update(&key, &wc);
	}
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

/* ------------------------------------------------------------ GPU opens */

static __always_inline int gpu_path_match(const u64 *path)
{
	for (u32 i = 0; i < AT_GPU_PREFIX_MAX; i++) {
		u32 idx = i;
		struct gpu_prefix *gp = gpu_prefixes.lookup(&idx);
		if (!gp || gp->mask[0] == 0)
			return 0;
		u64 diff = 0;
		for (u32 j = 0; j < AT_OPEN_PATH_LEN / 8; j++)
			diff |= (path[j] & gp->mask[j]) ^ gp->word[j];
		if (!diff)
			return 1;
	}
	return 0;
}

static __always_inline int on_open(const char *filename, int flags)
{
	u64 id = bpf_get_current_pid_tgid();
	if (!in_episode(id >> 32))
		return 0;
	u64 path[AT_OPEN_PATH_LEN / 8] = {};
	if (bpf_probe_read_user_str(path, sizeof(path), filename) <= 0)
		return 0;
	if (!gpu_path_match(path))
		return 0;
	return stash((u64)filename, 0, 0, flags, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat)
{
	return on_open(args->filename, args->flags);
}

static __always_inline int on_open_exit(long ret)
{
	struct sock_args *sa = unstash();
	if (!sa)
		return 0;
	u64 upath = sa->uaddr;
	s32 flags = sa->a2;
	unstash_done();
	RESERVE(e, struct open_event, AT_EV_GPU_OPEN);
	e->flags = flags;
	e->result = (s32)ret;
	bpf_probe_read_user_str(e->path, AT_OPEN_PATH_LEN, (void *)upath);
	events.ringbuf_submit(e, 0);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat)
{
	return on_open_exit(args->ret);
}

/* ------------------------------------------- connect / sendmsg deny (cgroup) */

static __always_inline u64 rules_for_task(u32 gen)
{
	u64 mask = cfg(gen ? AT_CFG_DENY_GLOBAL1 : AT_CFG_DENY_GLOBAL0);
	int slot = cgroup_slot();
	if (slot < 0) {
		u32 tgid = bpf_get_current_pid_tgid() >> 32;
		u32 *t = tracked.lookup(&tgid);
		if (!t)
			return mask;
		slot = *t >> 8;
	}
	u32 key = (gen << 16) | ((u32)slot & 0xffff);
	u64 *m = slot_mask.lookup(&key);
	if (m)
		mask |= *m;
	return mask;
}

static __always_inline u64 port_rules(u32 gen, u32 port, int exc)
{
	u32 key = (gen << 16) | (port & 0xffff);
	u64 *m = exc ? exc_port.lookup(&key) : deny_port.lookup(&key);
	u64 any = cfg(exc ? (gen ? AT_CFG_EXC_ANYPORT1 : AT_CFG_EXC_ANYPORT0)
			  : (gen ? AT_CFG_ANYPORT1 : AT_CFG_ANYPORT0));
	return any | (m ? *m : 0);
}

static __always_inline int deny_check(struct bpf_sock_addr *ctx, int v6, u32 user_type)
{
	u32 gen = (u32)cfg(AT_CFG_GEN) & 1;
	u64 mask = rules_for_task(gen);
	if (!mask)
		return 1;
	u32 proto = ctx->protocol;
	if (proto == IPPROTO_TCP)
		mask &= cfg(gen ? AT_CFG_TCP1 : AT_CFG_TCP0);
	else if (proto == IPPROTO_UDP)
		mask &= cfg(gen ? AT_CFG_UDP1 : AT_CFG_UDP0);
	else
		return 1;
	if (!mask)
		return 1;
	u32 port = bpf_ntohs((u16)ctx->user_port);
	mask &= port_rules(gen, port, 0);
	if (!mask)
		return 1;
	u64 *m, *x;
	u8 addr[16] = {};
	/* an IPv4-mapped IPv6 destination (::ffff:a.b.c.d) is an IPv4 one: an
	 * AF_INET6 socket must not get around an IPv4 deny */
	if (v6 && ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 &&
	    ctx->user_ip6[2] == bpf_htonl(0x0000ffff))
		v6 = 2;
	if (v6 == 1) {
		struct lpm6_key k = {.prefixlen = 32 + 128, .gen = gen};
		u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1], a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];
		__builtin_memcpy(&k.addr[0], &a0, 4);
		__builtin_memcpy(&k.addr[4], &a1, 4);
		__builtin_memcpy(&k.addr[8], &a2, 4);
		__builtin_memcpy(&k.addr[12], &a3, 4);
		__builtin_memcpy(addr, k.addr, 16);
		m = deny6.lookup(&k);
		x = exc6.lookup(&k);
	} else {
		struct lpm4_key k = {.prefixlen = 32 + 32, .gen = gen};
		u32 a = v6 ? ctx->user_ip6[3] : ctx->user_ip4;
		__builtin_memcpy(k.addr, &a, 4);
		__builtin_memcpy(addr, &a, 4);
		m = deny4.lookup(&k);
		x = exc4.lookup(&k);
	}
	mask &= m ? *m : 0;
	if (!mask)
		return 1;
	u64 exc = (x ? *x : 0) & port_rules(gen, port, 1);
	mask &= ~exc;
	if (!mask)
		return 1;
	/* monitor mode: allow; say so only for sendmsg (an unconnected UDP
	 * send has no other record; a connect has its own) */
	u32 would = cfg(AT_CFG_MONITOR) && !(mask & (1ULL << AT_RULE_CANARY));
	if (would && !(user_type & AT_DENY_SENDMSG))
		return 1;
	if (!would)
		count(AT_CNT_DENIED);
	struct deny_event *e = events.ringbuf_reserve(sizeof(struct deny_event));
	if (e) {
		fill_hdr(&e->h, AT_EV_DENY);
		e->rules = mask;
		e->family = v6 == 1 ? 10 : 2;
		e->protocol = proto;
		e->port = port;
		e->user_type = user_type | (would ? AT_DENY_WOULD : 0);
		__builtin_memcpy(e->addr, addr, 16);
		events.ringbuf_submit(e, 0);
	} else {
		count_lost(AT_EV_DENY);
	}
	return would ? 1 : 0;
}

int at_connect4(struct bpf_sock_addr *ctx) { return deny_check(ctx, 0, 0); }
int at_connect6(struct bpf_sock_addr *ctx) { return deny_check(ctx, 1, 0); }
int at_sendmsg4(struct bpf_sock_addr *ctx) { return deny_check(ctx, 0, AT_DENY_SENDMSG); }
int at_sendmsg6(struct bpf_sock_addr *ctx) { return deny_check(ctx, 1, AT_DENY_SENDMSG); }

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
