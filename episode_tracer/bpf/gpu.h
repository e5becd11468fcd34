/* agent-tracer GPU device opens: open, openat and openat2 of the path prefixes user space writes to
 * gpu_prefixes.
 * Included by tracer.c only (one compilation unit for bcc). */
#ifndef AT_GPU_H
#define AT_GPU_H

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

static __always_inline int on_open(const char *filename, int flags, u32 call)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;
	if (!in_episode(tgid))
		return 0;
	u64 path[AT_OPEN_PATH_LEN / 8] = {};
	if (bpf_probe_read_user_str(path, sizeof(path), filename) <= 0)
		return 0;
	if (!gpu_path_match(path))
		return 0;
	/* an episode process without the GPU right (episode_tracer/bpf/maps.h gpu_right) is
	 * killed here when the policy says so (gpu.toml kill_unregistered_open):
	 * the open completes, the process never returns to user space with it */
	u32 verdict = 0;
	if (gpu_right.lookup(&tgid)) {
		verdict |= AT_OPEN_RIGHT;
	} else {
		u32 gen = (u32)cfg(AT_CFG_GEN) & 1;
		if ((cfg(AT_CFG_GPU_OPEN_KILL) & (1ULL << gen)) && cgroup_slot() != AT_SLOT_CANARY) {
			bpf_send_signal(AT_SIGKILL);
			count(AT_CNT_GPU_OPEN_KILLED);
			verdict |= AT_OPEN_KILLED;
		}
	}
	return stash((u64)filename, (s32)call, verdict, flags, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat)
{
	return on_open(args->filename, args->flags, AT_OPEN_OPENAT);
}

TRACEPOINT_PROBE(syscalls, sys_enter_open)
{
	return on_open(args->filename, args->flags, AT_OPEN_OPEN);
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat2)
{
	/* struct open_how (uapi) starts with u64 flags */
	u64 how_flags = 0;
	bpf_probe_read_user(&how_flags, sizeof(how_flags), (void *)args->how);
	return on_open(args->filename, (int)how_flags, AT_OPEN_OPENAT2);
}

static __always_inline int on_open_exit(long ret)
{
	struct sock_args *sa = unstash();
	if (!sa)
		return 0;
	u64 upath = sa->uaddr;
	s32 flags = sa->a2;
	u32 call = (u32)sa->fd, verdict = sa->addrlen;
	unstash_done();
	RESERVE(e, struct open_event, AT_EV_GPU_OPEN);
	e->flags = flags;
	e->result = (s32)ret;
	e->verdict = verdict;
	e->call = call;
	bpf_probe_read_user_str(e->path, AT_OPEN_PATH_LEN, (void *)upath);
	events.ringbuf_submit(e, 0);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat)
{
	return on_open_exit(args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_open)
{
	return on_open_exit(args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat2)
{
	return on_open_exit(args->ret);
}

#endif
