/* agent-tracer common helpers: config and counters, scope (episode cgroup / tracked
 * tgid), record header and ring-buffer reservation with loss counting.
 * Included by tracer.c only (one compilation unit for bcc). */
#ifndef AT_COMMON_H
#define AT_COMMON_H

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

/* episode_tracer/bpf/nodesvc.h: the per-episode rate limit */
static __always_inline int episode_slot_now(u32 tgid);
static __always_inline int episode_rate_ok(int slot);

/* reserve a record and fill its header; counts the loss when the ring
 * buffer is full or the episode is over its rate (loss is never silent).
 * cgroup_mkdir and gate_race records are never rate limited. */
static __always_inline void *reserve(u32 size, u32 kind)
{
	if (kind != AT_EV_CGROUP_MKDIR && kind != AT_EV_GATE_RACE && cfg(AT_CFG_EPISODE_RATE) &&
	    !episode_rate_ok(episode_slot_now(bpf_get_current_pid_tgid() >> 32))) {
		count_lost(kind);
		return 0;
	}
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

#endif
