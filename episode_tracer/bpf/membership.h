/* agent-tracer membership an episode cannot leave: cgroup_attach_task.
 *
 * Every process that is in an episode cgroup is also in `tracked` (it joined
 * the cgroup here, was forked there, or was there when the tracer started:
 * user space seeds it). When a member is moved to a cgroup outside its
 * episode (root inside the episode writing a pid into another cgroup's
 * cgroup.procs), it stays tracked with its episode's slot, marked escaped:
 * its records, deny rules and lineage keep their episode, and an `escape`
 * record tells user space (default rule `episode-escape`: kill-episode).
 *
 * cgroup_attach_task fires in the writer's context after the move
 * succeeded, once per moved thread group (pid: the leader). A move of a
 * single thread (cgroup.threads) cannot leave the threaded subtree it is
 * in, so it cannot leave an episode either.
 * Included by tracer.c only (one compilation unit for bcc). */
#ifndef AT_MEMBERSHIP_H
#define AT_MEMBERSHIP_H

#ifndef AT_EPISODE_PREFIX
#define AT_EPISODE_PREFIX "/agent-tracer/"
#endif
#define AT_PREFIX_CMP 48

/* is a cgroup path (below the cgroup2 root) inside the episode root, e.g.
 * "/agent-tracer/<ID>[/sub]" (not the root itself, not a dot-directory
 * such as the self-test's canary)? */
static __always_inline int path_in_episode_root(const char *p)
{
	const char pre[] = AT_EPISODE_PREFIX;
	u32 n = sizeof(pre) - 1;
	if (n >= AT_PREFIX_CMP)
		return 0;
	for (u32 i = 0; i < AT_PREFIX_CMP; i++) {
		if (i >= n)
			break;
		if (p[i] != pre[i])
			return 0;
	}
	char c = p[n & (AT_PREFIX_CMP - 1)];
	return c != 0 && c != '.';
}

TRACEPOINT_PROBE(cgroup, cgroup_attach_task)
{
	if (args->dst_root != 0)   /* a cgroup v1 hierarchy (hybrid hosts): not ours */
		return 0;
	u32 target = args->pid;
	u64 dst = args->dst_id;
	char path[AT_PREFIX_CMP] = {};
	TP_DATA_LOC_READ_STR(path, dst_path, AT_PREFIX_CMP);
	u32 *reg = episode_cgroups.lookup(&dst);
	int into_episode = reg != 0 || path_in_episode_root(path);
	u32 *t = tracked.lookup(&target);
	u32 writer = bpf_get_current_pid_tgid() >> 32;
	u32 flags = 0;
	u32 slot;

	if (t) {
		u32 src = *t & 0xff;
		slot = *t >> 8;
		if (into_episode) {
			/* a move inside the episode root: its own registered cgroup
			 * (or a sub-cgroup of it) says nothing; anything else is for
			 * user space to judge (another episode's cgroup) */
			if (reg && *reg == slot)
				return 0;
			if (src != AT_TRACK_CGROUP && src != AT_TRACK_ESCAPED && !reg)
				return 0;
		} else {
			flags |= AT_ESC_OUTSIDE;
			if (src == AT_TRACK_CGROUP || src == AT_TRACK_ESCAPED) {
				u32 v = (slot << 8) | AT_TRACK_ESCAPED;
				tracked.update(&target, &v);
			} else {
				/* an env/lineage member was never in the episode's
				 * cgroup: moving it elsewhere leaves nothing */
				return 0;
			}
		}
	} else if (into_episode) {
		/* joins an episode (episode run's child, a process moved in):
		 * a member from now on */
		u32 v = ((reg ? *reg : 0) << 8) | AT_TRACK_CGROUP;
		tracked.update(&target, &v);
		return 0;
	} else {
		/* an untracked process moved out by an episode process (e.g. one
		 * that came into the episode cgroup by clone3(CLONE_INTO_CGROUP)
		 * from outside and was never tracked): it belongs to the mover's
		 * episode. A move by anyone else is none of ours. */
		if (writer == target)
			return 0;
		int ws = cgroup_slot();
		if (ws < 0) {
			u32 *wt = tracked.lookup(&writer);
			if (!wt)
				return 0;
			ws = *wt >> 8;
		}
		slot = (u32)ws;
		u32 v = (slot << 8) | AT_TRACK_ESCAPED;
		tracked.update(&target, &v);
		flags |= AT_ESC_OUTSIDE | AT_ESC_UNTRACKED;
	}
	if (writer != target)
		flags |= AT_ESC_BY_OTHER;
	count(AT_CNT_ESCAPES);
	RESERVE(e, struct escape_event, AT_EV_ESCAPE);
	e->dst_id = dst;
	e->target = target;
	e->slot = slot;
	e->flags = flags;
	e->dst_level = args->dst_level;
	TP_DATA_LOC_READ_STR(e->dst_path, dst_path, AT_CGROUP_PATH_LEN);
	events.ringbuf_submit(e, 0);
	return 0;
}

#endif
