/* agent-tracer node services and fail-closed-under-load: the cgroup unix-connect
 * program (episode connects to the node's control-plane sockets: container
 * engines, systemd, D-Bus, tmux/screen servers the episode did not start),
 * the record of which unix socket paths an episode bound itself, and the
 * per-episode record rate limit.
 * Included by tracer.c only (one compilation unit for bcc), after common.h
 * and before sockets.h (whose bind exit calls unix_bound). */
#ifndef AT_NODESVC_H
#define AT_NODESVC_H

/* ------------------------------------------------------------- maps */

/* unix deny rules: path -> mask of unix deny rules (bit = rule index),
 * longest prefix wins, so user space gives every entry the bits of the
 * shorter prefixes containing it. Written by user space per generation. */
BPF_LPM_TRIE(unix_deny, struct unix_path_key, u64, 4096);
/* unix socket paths bound by an episode process: canonical path (a
 * unix_path_key with prefixlen and gen 0) -> owner (episode cgroup id, or
 * 1<<63 | slot for env/lineage members). Written here at a successful bind;
 * an episode may connect to a socket it bound itself (a tmux server started
 * inside the episode). User space drops an ended episode's entries. */
BPF_TABLE("lru_hash", struct unix_path_key, u64, unix_owned, 8192);
/* scratch for reading a sun_path (128 bytes: masked reads stay in bounds) */
struct unix_raw {
	u8 b[128];
};
BPF_PERCPU_ARRAY(unix_scratch, struct unix_raw, 1);
/* per-episode token bucket (episode slot index -> bucket) and the records it
 * dropped (index -> count; user space zeroes both when it hands the index out): one episode's flood cannot fill the ring buffer
 * for the others. Records that must be judged (gated execs, deny records)
 * are never dropped by it. */
struct ep_bucket {
	u64 last;    /* ktime of the last refill */
	u64 tokens;
};
BPF_ARRAY(ep_rate, struct ep_bucket, AT_SLOT_INDEX_MASK + 1);  /* by slot index */
BPF_ARRAY(ep_lost, u64, AT_SLOT_INDEX_MASK + 1);

/* ktime of the exec gate's stop, tgid -> ns: the gated exec record carries
 * the same ktime, so user space can tell which stop a record judges, and a
 * held process whose record never came (ring buffer full) is found in
 * `gated`, judged from /proc, and its late record (if any) recognised */
BPF_HASH(gate_ktime, u32, u64, 4096);

/* unix connects held for user space's judgement of their target, by
 * thread id (struct unix_verdict, episode_tracer/bpf/events.h): the kernel writes
 * PENDING and deletes an entry it used, user space writes ALLOW/DENY */
BPF_HASH(unix_verdicts, u32, struct unix_verdict, 4096);

/* bpf_set_retval (helper 187, kernel 5.18+): the errno a refused cgroup
 * hook returns. bcc 0.26's helper table may not name it. */
static long (*at_set_retval)(int retval) = (void *)187;
#define AT_ECONNREFUSED 111
#define AT_ERESTARTNOINTR 513  /* the syscall runs again after the signal (kernel-internal errno) */

/* ---------------------------------------------------------- helpers */

/* episode slot of the current task (cgroup, else tracked), or -1 */
static __always_inline int episode_slot_now(u32 tgid)
{
	int slot = cgroup_slot();
	if (slot >= 0)
		return slot;
	u32 *t = tracked.lookup(&tgid);
	if (!t)
		return -1;
	return (int)((*t >> 8) & AT_IDENT_MASK);
}

/* who owns a socket bound now: the episode cgroup (below agent-tracer/),
 * else the tracked slot; 0 outside episodes */
static __always_inline u64 episode_owner(u32 tgid)
{
#if AT_EPISODE_LEVEL > 0
	u64 root = cfg(AT_CFG_EPISODE_ROOT);
	if (root && bpf_get_current_ancestor_cgroup_id(AT_EPISODE_LEVEL - 1) == root) {
		u64 cg = bpf_get_current_ancestor_cgroup_id(AT_EPISODE_LEVEL);
		if (cg && cg != root)
			return cg;
	}
#endif
	u64 cg = bpf_get_current_cgroup_id();
	u32 *slot = episode_cgroups.lookup(&cg);
	if (slot)
		return (1ULL << 63) | *slot;
	u32 *t = tracked.lookup(&tgid);
	if (t)
		return (1ULL << 63) | ((*t >> 8) & AT_IDENT_MASK);
	return 0;
}

/* the per-episode rate limit: 1 when a record of this episode may be
 * reserved now. Approximate under concurrency (no lock): a bucket shared by
 * the CPUs, refilled by elapsed time. */
static __always_inline int episode_rate_ok(int slot)
{
	u64 conf = cfg(AT_CFG_EPISODE_RATE);
	if (!conf || slot < 0)
		return 1;
	u32 idx = (u32)slot & AT_SLOT_INDEX_MASK;
	struct ep_bucket *b = ep_rate.lookup(&idx);
	if (!b)
		return 1;
	u64 rate = conf & 0xffffffff, burst = conf >> 32;
	u64 now = bpf_ktime_get_ns();
	u64 elapsed = now - b->last;
	if (elapsed > 10000000000ULL)
		elapsed = 10000000000ULL;
	u64 add = elapsed * rate / 1000000000ULL;
	if (add) {
		u64 t = b->tokens + add;
		b->tokens = t > burst ? burst : t;
		b->last = now;
	}
	if (!b->tokens) {
		u64 *l = ep_lost.lookup(&idx);
		if (l)
			__sync_fetch_and_add(l, 1);
		count(AT_CNT_RATE_DROPPED);
		return 0;
	}
	b->tokens--;
	return 1;
}

/* read a sun_path of `len` bytes (addrlen - 2) from user memory into `out`
 * (zero padded): a pathname up to its first NUL (what the kernel uses), an
 * abstract name (first byte 0) as all len bytes. A relative path or one
 * with '//', '/./' or '/../' components is flagged AT_UNIX_RELATIVE: the
 * text does not name the socket the kernel will find, so it is not judged
 * by text (refused while unix deny rules are loaded). Returns AT_UNIX_*
 * flags; *used gets the bytes of out in use. */
static __always_inline u32 unix_read_path(u64 uaddr, u32 len, u8 *out, u32 *used)
{
	u32 zero = 0;
	*used = 0;
	struct unix_raw *raw = unix_scratch.lookup(&zero);
	if (!raw)
		return AT_UNIX_NO_ARGS;
	__builtin_memset(raw->b, 0, sizeof(raw->b));
	if (len > AT_UNIX_PATH_LEN)
		len = AT_UNIX_PATH_LEN;
	if (len < 1)
		return 0;
	u8 first = 0;
	if (bpf_probe_read_user(&first, 1, (void *)(uaddr + 2)))
		return AT_UNIX_NO_ARGS;
	u32 flags = 0;
	long n;
	/* sizes pass through a volatile slot so that the compiler keeps the
	 * mask the verifier needs (it would drop it, knowing len <= 108) */
	volatile u32 vsz;
	if (first == 0) {
		/* abstract: the name is all len bytes */
		vsz = len;
		if (bpf_probe_read_user(raw->b, vsz & 0x7f, (void *)(uaddr + 2)))
			return AT_UNIX_NO_ARGS;
		n = len;
		flags = AT_UNIX_ABSTRACT;
	} else {
		/* a pathname: up to its first NUL, at most len bytes (what the
		 * kernel uses); the rest of raw stays zero */
		vsz = len + 1;
		n = bpf_probe_read_user_str(raw->b, vsz & 0x7f, (void *)(uaddr + 2));
		if (n <= 0)
			return AT_UNIX_NO_ARGS;
		n--;
	}
	bpf_probe_read_kernel(out, AT_UNIX_PATH_LEN, raw->b);
	*used = (u32)n;
	if (flags)
		return flags;
	if (first != '/')
		return AT_UNIX_RELATIVE;
	for (int i = 0; i < AT_UNIX_PATH_LEN; i++) {
		u8 c = raw->b[i];
		if (!c)
			break;
		if (c != '/')
			continue;
		u8 c1 = raw->b[(i + 1) & 0x7f];
		if (c1 == '/')
			return AT_UNIX_RELATIVE;
		if (c1 != '.')
			continue;
		u8 c2 = raw->b[(i + 2) & 0x7f];
		if (c2 == '/' || c2 == 0)
			return AT_UNIX_RELATIVE;
		u8 c3 = raw->b[(i + 3) & 0x7f];
		if (c2 == '.' && (c3 == '/' || c3 == 0))
			return AT_UNIX_RELATIVE;
	}
	return 0;
}

/* sockets.h: a successful bind of an AF_UNIX socket by an in-scope process:
 * remember that its episode owns the path */
static __always_inline void unix_bound(u64 uaddr, u32 addrlen)
{
	u16 fam = 0;
	if (addrlen <= 2 || bpf_probe_read_user(&fam, sizeof(fam), (void *)uaddr) || fam != AF_UNIX)
		return;
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	u64 owner = episode_owner(tgid);
	if (!owner)
		return;
	struct unix_path_key k = {};
	u32 used = 0;
	u32 flags = unix_read_path(uaddr, addrlen - 2, k.path, &used);
	if (flags & (AT_UNIX_NO_ARGS | AT_UNIX_RELATIVE) || !used)
		return;
	unix_owned.update(&k, &owner);
}

/* --------------------------------------------------- unix connect (cgroup) */

/* what the text of a unix connect's address decides (unix_classify) */
#define AT_UC_ALLOW 0
#define AT_UC_DENY 1     /* refused by the text: a deny entry, or arguments unseen */
#define AT_UC_GATE 2     /* a pathname the text cannot clear: user space judges the target */

/* FNV-1a 32 over the whole NUL-padded path (AT_UNIX_KEY_LEN bytes), read
 * from the per-CPU scratch buffer unix_read_path just filled (a map value:
 * no stack, and a masked index the verifier follows) */
static __always_inline u32 unix_hash(void)
{
	u32 zero = 0;
	struct unix_raw *raw = unix_scratch.lookup(&zero);
	if (!raw)
		return 0;
	u32 h = 2166136261u;
	for (u32 i = 0; i < AT_UNIX_KEY_LEN; i++)
		h = (h ^ raw->b[i & 0x7f]) * 16777619u;
	return h;
}

/* Judge a unix connect by its text: *k gets the path (k->gen, prefixlen
 * set for the deny trie), *flags the AT_UNIX_* flags, *mask the matched
 * deny rules. Abstract names are judged here (no symlinks: the name is
 * the socket). A pathname is refused here when the text is in a deny
 * entry and the episode did not bind it; any other pathname (relative,
 * '..', or absolute: a symlink or a bind mount may lead anywhere) goes to
 * user space, which resolves it in the process's view and judges the
 * socket it names, while the thread is stopped (AT_UC_GATE). Monitor mode
 * never stops: the text decides and a refusal is reported as "would". */
static __always_inline int unix_classify(u64 uaddr, u32 addrlen, u32 tgid, u32 gen, struct unix_path_key *k,
					 u32 *used, u32 *flags, u64 *mask)
{
	*mask = 0;
	*used = 0;
	if (!uaddr) {
		*flags = AT_UNIX_NO_ARGS;
		return AT_UC_DENY;
	}
	*flags = unix_read_path(uaddr, addrlen > 2 ? addrlen - 2 : 0, k->path, used);
	if (*flags & AT_UNIX_NO_ARGS)
		return AT_UC_DENY;
	if (!*used)
		return AT_UC_ALLOW;
	int monitor = cfg(AT_CFG_MONITOR) != 0;
	if (*flags & AT_UNIX_RELATIVE)
		return monitor ? AT_UC_DENY : AT_UC_GATE;
	/* a socket the episode bound itself (a tmux it started) */
	k->prefixlen = 0;
	k->gen = 0;
	u64 *own = unix_owned.lookup(k);
	int owned = own && *own == episode_owner(tgid);
	k->prefixlen = 32 + 8 * AT_UNIX_KEY_LEN;
	k->gen = gen;
	u64 *m = unix_deny.lookup(k);
	if (m && *m && !owned) {
		*mask = *m;
		return AT_UC_DENY;
	}
	if ((*flags & AT_UNIX_ABSTRACT) || monitor)
		return AT_UC_ALLOW;
	return AT_UC_GATE;
}

static __always_inline void unix_report(u64 mask, u32 flags, u32 used, u32 hash, const u8 *path)
{
	struct unix_deny_event *e = events.ringbuf_reserve(sizeof(struct unix_deny_event));
	if (!e) {
		count_lost(AT_EV_UNIX_DENY);
		return;
	}
	fill_hdr(&e->h, AT_EV_UNIX_DENY);
	e->rules = mask;
	e->flags = flags;
	e->pathlen = used;
	e->hash = hash;
	e->_pad = 0;
	bpf_probe_read_kernel(e->path, AT_UNIX_KEY_LEN, path);
	events.ringbuf_submit(e, 0);
}

/* sys_enter_connect (sockets.h), after the stash: a connect the unix hook
 * will send to user space stops the thread now (bpf_send_signal is not
 * available to the cgroup hook); the hook then returns -ERESTARTNOINTR, so
 * the connect runs again after the stop, with the verdict in place. */
static __always_inline void unix_gate_enter(u64 uaddr, u32 addrlen)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32, tid = (u32)id;
	u32 gen = (u32)cfg(AT_CFG_GEN) & 1;
	if (!(cfg(AT_CFG_UNIX_DENY) & (1ULL << gen)) || !in_episode(tgid))
		return;
	u16 fam = 0;
	if (addrlen <= 2 || bpf_probe_read_user(&fam, sizeof(fam), (void *)uaddr) || fam != AF_UNIX)
		return;
	struct unix_path_key k = {};
	u32 used, flags;
	u64 mask;
	if (unix_classify(uaddr, addrlen, tgid, gen, &k, &used, &flags, &mask) != AT_UC_GATE)
		return;
	u32 h = unix_hash();
	struct unix_verdict *v = unix_verdicts.lookup(&tid);
	if (v && v->hash == h && v->state != AT_UNIX_V_PENDING)
		return;   /* the restarted connect: its verdict is in place */
	if (!v || v->hash != h) {
		struct unix_verdict nv = {.state = AT_UNIX_V_PENDING, .hash = h};
		if (unix_verdicts.update(&tid, &nv)) {
			count(AT_CNT_MAP_FULL);   /* the hook refuses it: no entry */
			return;
		}
		unix_report(0, flags | AT_UNIX_GATE, used, h, k.path);
	}
	/* (a pending entry with this hash: continued by someone else before
	 * the verdict; stopped again, like the exec gate's race) */
	bpf_send_signal(AT_SIGSTOP);
	count(AT_CNT_UNIX_GATED);
}

int at_connect_unix(struct bpf_sock_addr *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32, tid = (u32)id;
	u32 gen = (u32)cfg(AT_CFG_GEN) & 1;
	if (!(cfg(AT_CFG_UNIX_DENY) & (1ULL << gen)))
		return 1;
	if (!in_episode(tgid))
		return 1;
	struct unix_path_key k = {};
	u32 used = 0, flags = 0;
	u64 mask = 0;
	/* the connect's arguments, stashed at sys_enter_connect (sockets.h):
	 * absent for io_uring, 32-bit socketcall, or a full sock_pending map.
	 * Then the path cannot be judged: refused. */
	struct sock_args *sa = sock_pending.lookup(&tid);
	int c = unix_classify(sa ? sa->uaddr : 0, sa ? sa->addrlen : 0, tgid, gen, &k, &used, &flags, &mask);
	if (c == AT_UC_ALLOW)
		return 1;
	if (c == AT_UC_GATE) {
		u32 h = unix_hash();
		struct unix_verdict *v = unix_verdicts.lookup(&tid);
		if (v && v->hash == h && v->state == AT_UNIX_V_PENDING) {
			/* stopped at sys_enter_connect: run the connect again after
			 * the stop, when user space has judged the target */
			at_set_retval(-AT_ERESTARTNOINTR);
			return 0;
		}
		if (v && v->hash == h && v->state == AT_UNIX_V_ALLOW) {
			unix_verdicts.delete(&tid);
			return 1;
		}
		if (v && v->hash == h && v->state == AT_UNIX_V_DENY) {
			mask = v->rules;
			unix_verdicts.delete(&tid);
		} else {
			flags |= AT_UNIX_NO_ARGS;   /* no verdict entry could be made: fail closed */
		}
	}
	/* monitor mode: allow and report; the self-test's canary path stays refused */
	u32 would = cfg(AT_CFG_MONITOR) && !(mask & (1ULL << AT_RULE_CANARY)) ? AT_UNIX_WOULD : 0;
	if (!would)
		count(mask ? AT_CNT_UNIX_DENIED : AT_CNT_UNIX_UNVERIFIED);
	unix_report(mask, flags | would, used, 0, k.path);
	if (would)
		return 1;
	/* refused as "no server listening" (ECONNREFUSED), not EPERM: a client
	 * that starts its own server when none answers (tmux, screen) then
	 * starts one inside the episode, whose socket the episode owns */
	at_set_retval(-AT_ECONNREFUSED);
	return 0;
}

#endif
