/* agent-tracer processes: fork, exec (argv capture, kill list, exec gate), exit and
 * fatal signals, cgroup_mkdir.
 * Included by tracer.c only (one compilation unit for bcc). */
#ifndef AT_PROCESS_H
#define AT_PROCESS_H

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
	if (thread_clones.update(&child, &one))
		count(AT_CNT_MAP_FULL);
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
	u32 fflags = 0;
	if (src) {
		/* a child of a cgroup member (or of an escaped one) is one too: it
		 * is where its parent is, and stays a member if moved */
		u32 v = *src;
		if ((v & 0xff) == AT_TRACK_ENV)
			v = (v & ~0xffu) | AT_TRACK_LINEAGE;
		if (tracked.update(&child, &v))
			fflags |= AT_FORK_UNTRACKED;
	} else if (!AT_SCOPE_ALL || cgroup_slot() >= 0) {
		int slot = cgroup_slot();
		if (slot >= 0) {
			u32 v = ((u32)slot << 8) | AT_TRACK_CGROUP;
			if (tracked.update(&child, &v))
				fflags |= AT_FORK_UNTRACKED;
		}
	}
	/* map full: counted, and the fork record says so (user space stops a
	 * child that only lineage kept in its episode: fail closed) */
	if (fflags)
		count(AT_CNT_MAP_FULL);
	/* the GPU right passes to a fork (a worker that did not exec) */
	if (gpu_right.lookup(&tgid)) {
		u32 r = AT_GPU_RIGHT;
		gpu_right.update(&child, &r);
	}
	RESERVE(e, struct fork_event, AT_EV_FORK);
	e->child_pid = child;
	e->flags = fflags;
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
			if (tracked.update(&tgid, &v))
				count(AT_CNT_MAP_FULL);
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
	/* map full: counted; sched_process_exec still judges an episode's exec
	 * (argv then comes from /proc) */
	if (exec_pending.update(&tid, e))
		count(AT_CNT_MAP_FULL);
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
	/* scope is decided here, whatever syscall entry produced the exec: a
	 * 32-bit int 0x80 execve passes no syscalls:* tracepoint, so it has no
	 * pending record (nor has an exec whose pending entry did not fit); an
	 * episode member without stashed arguments is still killed, gated and
	 * reported (argv from /proc) like the others */
	int cg_slot = cgroup_slot();
	int scoped = p != 0 || in_scope(tgid);
	if (cg_slot >= 0 && !tracked.lookup(&tgid)) {
		/* a member of an episode cgroup the attach/fork paths did not see
		 * (e.g. clone3 CLONE_INTO_CGROUP from outside): tracked from here */
		u32 v = ((u32)cg_slot << 8) | AT_TRACK_CGROUP;
		tracked.update(&tgid, &v);
	}
	u64 gk = 0;

	/* known-bad names: killed here, before the new image runs */
	if (kill == 2 || (kill == 1 && scoped && (AT_SCOPE_ALL ? in_episode(tgid) : 1))) {
		bpf_send_signal(AT_SIGKILL);
		count(AT_CNT_EXEC_KILLED);
	} else {
		kill = 0;
	}
	u32 flags = p ? p->flags : AT_EXEC_NO_ARGV;
	if (!p && scoped)
		count(AT_CNT_EXEC_NO_ARGV);
	/* the GPU right does not pass through an exec: user space re-grants it
	 * (in the gate) when the registration names the new executable */
	if (gpu_right.lookup(&tgid)) {
		gpu_right.delete(&tgid);
		flags |= AT_EXEC_GPU_RIGHT;
	}
	if (kill) {
		flags |= AT_EXEC_KILLED;
	} else if (exec_gate(scoped, tgid, &ck)) {
		u32 held = 1;
		if (gated.update(&tgid, &held)) {
			/* the gate map is full: a stopped process user space cannot
			 * find would hang unjudged. An episode's exec is denied
			 * (killed); outside episodes it runs (a full map must not
			 * stop the node's own processes). Counted either way. */
			count(AT_CNT_MAP_FULL);
			if (scoped && (AT_SCOPE_ALL ? in_episode(tgid) : 1)) {
				bpf_send_signal(AT_SIGKILL);
				count(AT_CNT_EXEC_KILLED);
				flags |= AT_EXEC_KILLED;
			}
		} else {
			gk = bpf_ktime_get_ns();
			gate_ktime.update(&tgid, &gk);
			bpf_send_signal(AT_SIGSTOP);
			count(AT_CNT_GATED);
			flags |= AT_EXEC_GATED;
		}
	}
	/* a record that no verdict waits on may be dropped by the episode's
	 * rate limit (nodesvc.h); a gated one never is: if it cannot be reserved
	 * the process stays held and user space judges it from /proc */
	int judged = (flags & (AT_EXEC_KILLED | AT_EXEC_GATED)) != 0;
	if (!p) {
		/* no syscall-entry record: in scope (a 32-bit execve, a full
		 * pending map) it is reported and, when execs are gated, held for
		 * user space to read argv from /proc; out of scope only when
		 * killed or gated (scope = "all" rules) */
		if (!judged && !scoped)
			return 0;
		if (!judged && !episode_rate_ok(episode_slot_now(tgid))) {
			count_lost(AT_EV_EXEC);
			return 0;
		}
		struct exec_event *e = events.ringbuf_reserve(sizeof(struct exec_event));
		if (!e) {
			count_lost(AT_EV_EXEC);
			return 0;
		}
		fill_hdr(&e->h, AT_EV_EXEC);
		if (gk)
			e->h.ktime = gk;
		e->flags = flags;
		e->argc = 0;
		e->args_len = 0;
		e->old_pid = old;
		e->episode[0] = 0;
		TP_DATA_LOC_READ_STR(e->filename, filename, AT_FILENAME_LEN);
		events.ringbuf_submit(e, 0);
		return 0;
	}

	if (!judged && !episode_rate_ok(episode_slot_now(tgid))) {
		count_lost(AT_EV_EXEC);
		exec_pending.delete(&old);
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
	if (gk)
		e->h.ktime = gk;
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

/* The SIGCONT race re-stop of the exec gate: only does work after a race was
 * seen (sticky, one array read per syscall otherwise): the continued process
 * is stopped again at its first syscall. */
TRACEPOINT_PROBE(raw_syscalls, sys_enter)
{
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
	/* the process ends with its last thread: a leader that leaves early
	 * (pthread_exit, SYS_exit) does not drop the rest of the group */
#if AT_HAVE_GROUP_DEAD
	if (!args->group_dead)
		return 0;
#else
	if (tid != tgid)
		return 0;
#endif
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
	gate_ktime.delete(&tgid);
	self_tree.delete(&tgid);
	gpu_right.delete(&tgid);
	if (!scoped)
		return 0;
	RESERVE(e, struct exit_event, AT_EV_EXIT);
	e->code = code;
	e->signal = sig;
	events.ringbuf_submit(e, 0);
	return 0;
}

#endif
