/* agent-tracer wire: the first application bytes of every new outbound TCP
 * flow of an episode, in the packet path (cgroup_skb egress), by socket
 * cookie: whatever call produced the bytes (write, send*, sendmsg/sendmmsg,
 * writev, sendfile, splice, io_uring, a dup'd or passed fd, the 32-bit
 * entry, TCP Fast Open), IPv4 and IPv6.
 *
 * Scope: a flow is an episode's when the connecting process is in an episode
 * (learned by the connect programs, wire_learn) or the socket's cgroup (kept
 * from its creation, also when the socket is passed out) is an episode
 * cgroup. The programs are attached at the cgroup2 root, because processes
 * tracked by env marker or lineage live outside <cgroup2>/agent-tracer; for
 * the rest of the node a packet costs one hash lookup that misses and the
 * socket-cgroup check.
 *
 * The kernel decides the hold first, then reports: while an enforcing
 * protocol rule is loaded (AT_CFG_WIRE_HOLD) payload beyond what user space
 * has allowed (flow_verdict.upto) is dropped (TCP keeps it queued and sends
 * it again) whether or not its report could be reserved; a denied flow drops
 * every packet. User space times out held flows (flow_held) with deny.
 * Included by tracer.c only (one compilation unit for bcc). */
#ifndef AT_WIRE_H
#define AT_WIRE_H

#define AT_TCP_FIN 0x01
#define AT_TCP_SYN 0x02
#define AT_TCP_RST 0x04
#define AT_TCP_ACK 0x10

/* a TCP connect of an episode process: remember the flow and who made it.
 * Returns -1 when the flow map is full (the connect is refused: an episode
 * flow is never let out uninspected), else 0. */
static __always_inline int wire_learn(struct bpf_sock_addr *ctx)
{
	if (ctx->type != 1 /* SOCK_STREAM */ || ctx->protocol != IPPROTO_TCP)
		return 0;
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;
	if (!in_episode(tgid))
		return 0;
	u64 cookie = bpf_get_socket_cookie(ctx);
	if (flows.lookup(&cookie))
		return 0;
	struct flow nf = {};
	nf.first_ns = bpf_ktime_get_ns();
	nf.cgroup_id = bpf_get_current_cgroup_id();
	nf.state = AT_FLOW_NEW;
	nf.tgid = tgid;
	nf.uid = (u32)bpf_get_current_uid_gid();
	bpf_get_current_comm(nf.comm, sizeof(nf.comm));
	if (flows.update(&cookie, &nf)) {
		count(AT_CNT_WIRE_FULL);
		return cfg(AT_CFG_MONITOR) ? 0 : -1;
	}
	return 0;
}

/* the skb's socket was made in an episode cgroup (or below one) */
static __always_inline int skb_in_episode(struct __sk_buff *skb)
{
	u64 cg = bpf_skb_cgroup_id(skb);
	if (episode_cgroups.lookup(&cg))
		return 1;
#if AT_EPISODE_LEVEL > 0
	u64 anc = bpf_skb_ancestor_cgroup_id(skb, AT_EPISODE_LEVEL);
	if (!anc)
		return 0;
	if (episode_cgroups.lookup(&anc))
		return 1;
	u64 root = cfg(AT_CFG_EPISODE_ROOT);
	if (root && bpf_skb_ancestor_cgroup_id(skb, AT_EPISODE_LEVEL - 1) == root)
		return 1;
#endif
	return 0;
}

struct wire_pkt {
	u32 poff;     /* payload offset from the network header */
	u32 plen;     /* payload bytes (the whole GSO packet) */
	u32 seq;
	u16 sport;
	u16 dport;
	u8 tflags;    /* TCP flags */
	u8 v6;
	u8 _pad[2];
	u8 daddr[16];
};

/* 1: a TCP packet, fields filled; 0: not TCP (or not parseable) */
static __always_inline int wire_parse(struct __sk_buff *skb, struct wire_pkt *p)
{
	u32 ihl;
	if (skb->protocol == bpf_htons(0x0800)) {
		u8 ip[20];
		if (bpf_skb_load_bytes(skb, 0, ip, sizeof(ip)))
			return 0;
		if ((ip[0] >> 4) != 4 || ip[9] != IPPROTO_TCP)
			return 0;
		if ((ip[6] & 0x1f) || ip[7])  /* a later fragment: no TCP header */
			return 0;
		ihl = (ip[0] & 0xf) * 4;
		if (ihl < 20)
			return 0;
		__builtin_memcpy(p->daddr, &ip[16], 4);
		p->v6 = 0;
	} else if (skb->protocol == bpf_htons(0x86DD)) {
		u8 ip[40];
		if (bpf_skb_load_bytes(skb, 0, ip, sizeof(ip)))
			return 0;
		if (ip[6] != IPPROTO_TCP)
			return 0;
		ihl = 40;
		__builtin_memcpy(p->daddr, &ip[24], 16);
		p->v6 = 1;
	} else {
		return 0;
	}
	u8 th[20];
	if (bpf_skb_load_bytes(skb, ihl, th, sizeof(th)))
		return 0;
	u32 doff = (th[12] >> 4) * 4;
	if (doff < 20)
		return 0;
	p->sport = (th[0] << 8) | th[1];
	p->dport = (th[2] << 8) | th[3];
	p->seq = ((u32)th[4] << 24) | ((u32)th[5] << 16) | ((u32)th[6] << 8) | th[7];
	p->tflags = th[13];
	p->poff = ihl + doff;
	p->plen = skb->len > p->poff ? skb->len - p->poff : 0;
	return 1;
}

static __always_inline int wire_hold_on(void)
{
	u32 gen = (u32)cfg(AT_CFG_GEN) & 1;
	return (cfg(AT_CFG_WIRE_HOLD) >> gen) & 1;
}

/* the flow is decided: its report buffer and hold mark go */
static __always_inline void wire_forget(u64 *cookie)
{
	flow_bufs.delete(cookie);
	flow_held.delete(cookie);
}

/* append the packet's new bytes (in sequence order) to the flow's buffer and
 * report the buffer when it grew or its last report was not reserved */
static __always_inline void wire_take(struct __sk_buff *skb, struct flow *f, u64 *cookie,
				      struct wire_pkt *p, u32 start, u32 end, u32 wflags)
{
	u32 filled = f->filled;
	int grow = filled < AT_WIRE_CAP && start <= filled && end > filled;
	if (!grow && f->reported >= filled)
		return;
	struct wire_event *b = flow_bufs.lookup(cookie);
	if (!b) {
		u32 zero = 0;
		struct wire_event *z = wire_zero.lookup(&zero);
		if (!z)
			return;
		if (flow_bufs.update(cookie, z)) {
			count(AT_CNT_WIRE_FULL);
			return;
		}
		b = flow_bufs.lookup(cookie);
		if (!b)
			return;
	}
	if (grow) {
		u32 pos = filled & (AT_WIRE_CAP - 1);
		u32 n = end - filled;
		if (n > AT_WIRE_CAP - pos)
			n = AT_WIRE_CAP - pos;
		/* the verifier must see the bound on the register passed on */
		asm volatile("" : "+r"(n));
		n &= (2 * AT_WIRE_CAP - 1);
		if (n > AT_WIRE_CAP)
			n = AT_WIRE_CAP;
		u32 from = p->poff + (filled - start);
		if (n > 0 && !bpf_skb_load_bytes(skb, from, &b->data[pos], n)) {
			filled = pos + n;
			f->filled = filled;
		}
	}
	b->h.ktime = bpf_ktime_get_ns();
	b->h.cgroup_id = f->cgroup_id;
	b->h.kind = AT_EV_PROTOCOL;
	b->h.pid = f->tgid;
	b->h.tid = 0;
	b->h.uid = f->uid;
	__builtin_memcpy(b->h.comm, f->comm, AT_COMM_LEN);
	b->cookie = *cookie;
	b->captured = filled;
	b->flags = wflags | (filled >= AT_WIRE_CAP ? AT_WIRE_FULL : 0) | (p->v6 ? AT_WIRE_V6 : 0);
	b->upto = f->upto;
	b->family = p->v6 ? 10 : 2;
	b->port = p->dport;
	b->sport = p->sport;
	__builtin_memcpy(b->addr, p->daddr, 16);
	if (events.ringbuf_output(b, AT_WIRE_HEAD + (filled & (2 * AT_WIRE_CAP - 1)), 0) == 0) {
		f->reported = filled;
	} else {
		count_lost(AT_EV_PROTOCOL);
		count(AT_CNT_WIRE_UNREPORTED);
	}
}

int at_wire_egress(struct __sk_buff *skb)
{
	u64 cookie = bpf_get_socket_cookie(skb);
	struct flow *f = flows.lookup(&cookie);
	if (f) {
		if (f->state == AT_FLOW_PASS)
			return 1;
		if (f->state == AT_FLOW_DENY) {
			count(AT_CNT_WIRE_DENIED);
			return 0;
		}
	}
	struct wire_pkt p = {};
	int ok = wire_parse(skb, &p);
	if (!f) {
		if (!ok || !skb_in_episode(skb))
			return 1;
		int active = (p.tflags & (AT_TCP_SYN | AT_TCP_ACK)) == AT_TCP_SYN;
		struct flow nf = {};
		nf.first_ns = bpf_ktime_get_ns();
		nf.cgroup_id = bpf_skb_cgroup_id(skb);
		/* not opened by us (a SYN-ACK: accepted), or older than the
		 * tracer: not inspected, counted */
		nf.state = active ? AT_FLOW_NEW : AT_FLOW_PASS;
		if (flows.update(&cookie, &nf)) {
			count(AT_CNT_WIRE_FULL);
			return active && !cfg(AT_CFG_MONITOR) ? 0 : 1;
		}
		if (!active) {
			count(AT_CNT_WIRE_MIDSTREAM);
			return 1;
		}
		f = flows.lookup(&cookie);
		if (!f)
			return 0;
	}
	int hold = wire_hold_on();
	if (!ok) {
		/* a packet of an episode's TCP flow we cannot parse (IPv6
		 * extension headers...): held like an undecided one */
		if (hold && f->state != AT_FLOW_PASS) {
			count(AT_CNT_WIRE_HELD);
			return 0;
		}
		return 1;
	}
	if (f->state == AT_FLOW_NEW) {
		if ((p.tflags & (AT_TCP_SYN | AT_TCP_ACK)) != AT_TCP_SYN) {
			f->state = AT_FLOW_PASS;
			count(AT_CNT_WIRE_MIDSTREAM);
			return 1;
		}
		f->seq0 = p.seq + 1;
		f->state = AT_FLOW_INSPECT;
	}
	struct flow_verdict *v = flow_verdict.lookup(&cookie);
	if (v) {
		if (v->flags & AT_VERDICT_DENY) {
			f->state = AT_FLOW_DENY;
			wire_forget(&cookie);
			count(AT_CNT_WIRE_DENIED);
			return 0;
		}
		if (v->flags & AT_VERDICT_DONE) {
			f->state = AT_FLOW_PASS;
			wire_forget(&cookie);
			return 1;
		}
		f->upto = v->upto;
	}
	if (!p.plen)
		return 1;  /* SYN, pure ACK, FIN or RST without data */
	u32 start = p.seq + ((p.tflags & AT_TCP_SYN) ? 1 : 0) - f->seq0;
	if (start > 0x7fffffff)
		start = 0;  /* before byte 0 (cannot be): judge it from the start */
	u32 end = start + p.plen;
	int drop = hold && end > f->upto;
	u32 wflags = (drop ? AT_WIRE_HELD : 0) | ((p.tflags & AT_TCP_SYN) ? AT_WIRE_SYN_DATA : 0);
	wire_take(skb, f, &cookie, &p, start, end, wflags);
	if (drop) {
		count(AT_CNT_WIRE_HELD);
		if (!flow_held.lookup(&cookie)) {
			u64 now = bpf_ktime_get_ns();
			if (flow_held.update(&cookie, &now))
				count(AT_CNT_WIRE_FULL);
		}
		return 0;
	}
	flow_held.delete(&cookie);
	return 1;
}

/* socket release (close of its last fd): a passed or never-inspected flow
 * is forgotten; a held or denied one stays (an orphaned TCP socket still
 * sends its queue) until user space sees the socket gone */
int at_wire_release(struct bpf_sock *sk)
{
	u64 cookie = bpf_get_socket_cookie(sk);
	struct flow *f = flows.lookup(&cookie);
	if (!f)
		return 1;
	if (f->state == AT_FLOW_INSPECT || f->state == AT_FLOW_DENY) {
		f->flags |= AT_FLOW_RELEASED;
		return 1;
	}
	flows.delete(&cookie);
	flow_verdict.delete(&cookie);
	wire_forget(&cookie);
	return 1;
}

#endif
