/* agent-tracer GPU device opens: openat of the path prefixes user space writes to
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

#endif
