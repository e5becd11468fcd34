/* agent-tracer datagrams: the first bytes of UDP datagrams that episode sockets
 * send to hosts that are not loopback, read in the packet path by a cgroup_skb
 * egress program (whatever call wrote them: send, sendto, sendmsg, sendmmsg,
 * io_uring, a passed fd). User space judges them (episode_tracer/datagram.py: DNS
 * tunnels, foreign resolvers, QUIC and UDP relays).
 * Included by tracer.c only (one compilation unit for bcc).
 *
 * Maps of this topic:
 *   udp_socks  socket cookie -> struct udp_sock: UDP sockets an episode process
 *              connected or sent on (written by the sock_addr programs, which
 *              see the calling task; the skb program does not). A socket keeps
 *              its entry when passed to a process outside the episode.
 */
#ifndef AT_UDP_H
#define AT_UDP_H

struct udp_sock {
	u32 slot;
	u32 pid;      /* the last episode process that connected/sent */
	u32 sent;     /* datagrams reported to ports other than 53 */
	char comm[AT_COMM_LEN];
};
BPF_TABLE("lru_hash", u64, struct udp_sock, udp_socks, 16384);
BPF_PERCPU_ARRAY(udp_scratch, struct udp_sock, 1);

/* from the sock_addr programs (connect4/6, sendmsg4/6) */
static __always_inline void udp_note(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol != IPPROTO_UDP || !cfg(AT_CFG_UDP_INSPECT))
		return;
	int slot = task_slot();
	if (slot < 0)
		return;
	u64 cookie = bpf_get_socket_cookie(ctx);
	u32 pid = bpf_get_current_pid_tgid() >> 32;
	struct udp_sock *u = udp_socks.lookup(&cookie);
	if (u) {
		if (u->pid != pid) {
			u->pid = pid;
			bpf_get_current_comm(u->comm, sizeof(u->comm));
		}
		return;
	}
	u32 zero = 0;
	struct udp_sock *n = udp_scratch.lookup(&zero);
	if (!n)
		return;
	n->slot = (u32)slot;
	n->pid = pid;
	n->sent = 0;
	bpf_get_current_comm(n->comm, sizeof(n->comm));
	udp_socks.update(&cookie, n);
}

/* 0 (drop) when the query name of the DNS message at `q` (the question,
 * after the 12-byte header) has a label of the enforced length or more, or a
 * length byte no query has (a pointer or an extended label type) */
static __always_inline u32 dns_label_verdict(struct __sk_buff *skb, u32 q, u32 len)
{
	u32 gen = (u32)cfg(AT_CFG_GEN) & 1;
	u32 thr = (cfg(AT_CFG_DNS_DROP_LABEL) >> (8 * gen)) & 0xff;
	if (!thr || len < 13)
		return 1;
	u32 pos = q;
	for (int i = 0; i < 128; i++) {
		u8 l;
		if (bpf_skb_load_bytes(skb, pos, &l, 1))
			return 1;   /* the name ends past the packet: not a query the resolver reads */
		if (l == 0)
			return 1;
		if ((l & 0xc0) || l >= thr)
			return 0;
		pos += l + 1;
	}
	return 0;   /* more labels than a 255-byte name can hold */
}

/* episode slot of the cgroup the packet's socket was created in, or -1 */
static __always_inline int skb_slot(struct __sk_buff *skb)
{
	u64 cg = bpf_skb_cgroup_id(skb);
	u32 *slot = episode_cgroups.lookup(&cg);
	if (slot)
		return *slot;
#if AT_EPISODE_LEVEL > 0
	cg = bpf_skb_ancestor_cgroup_id(skb, AT_EPISODE_LEVEL);
	if (cg) {
		slot = episode_cgroups.lookup(&cg);
		if (slot)
			return *slot;
	}
	u64 root = cfg(AT_CFG_EPISODE_ROOT);
	if (root && cg != root && bpf_skb_ancestor_cgroup_id(skb, AT_EPISODE_LEVEL - 1) == root)
		return 0;
#endif
	return -1;
}

/* egress mode covers what the sock_addr programs never see: packets of raw
 * sockets and of ICMP "ping" sockets (any socket neither TCP nor UDP) of an
 * episode cgroup in egress mode are dropped here */
static __always_inline int egress_other_proto(struct __sk_buff *skb)
{
	u32 gen = (u32)cfg(AT_CFG_GEN) & 1;
	if (!(cfg(AT_CFG_EGRESS) & (1ULL << gen)))
		return 1;
	struct bpf_sock *sk = skb->sk;
	if (!sk)
		return 1;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return 1;
	u32 proto = sk->protocol;
	if (sk->type != 3 /* SOCK_RAW */ && (proto == IPPROTO_TCP || proto == IPPROTO_UDP))
		return 1;
	int slot = skb_slot(skb);
	if (slot < 0)
		return 1;
	if (!egress_profile(gen, slot))
		return 1;
	u32 would = cfg(AT_CFG_MONITOR) ? AT_EGRESS_WOULD : 0;
	if (!would)
		count(AT_CNT_EGRESS_DENIED);
	struct egress_event *e = events.ringbuf_reserve(sizeof(struct egress_event));
	if (e) {
		__builtin_memset(&e->h, 0, sizeof(e->h));
		e->h.ktime = bpf_ktime_get_ns();
		e->h.cgroup_id = bpf_skb_cgroup_id(skb);
		e->h.kind = AT_EV_EGRESS;
		e->family = sk->family;
		e->protocol = proto;
		e->port = 0;
		e->flags = AT_EGRESS_PROTO | AT_EGRESS_PACKET | would;
		e->slot = (u32)slot;
		e->_pad = 0;
		__builtin_memset(e->addr, 0, 16);
		/* the destination from the packet (an unconnected raw socket has none) */
		if (skb->protocol == bpf_htons(0x0800)) {
			u32 d = 0;
			bpf_skb_load_bytes(skb, 16, &d, 4);
			e->addr[10] = 0xff;
			e->addr[11] = 0xff;
			__builtin_memcpy(&e->addr[12], &d, 4);
		} else if (skb->protocol == bpf_htons(0x86DD)) {
			bpf_skb_load_bytes(skb, 24, e->addr, 16);
		}
		events.ringbuf_submit(e, 0);
	} else {
		count_lost(AT_EV_EGRESS);
	}
	return would ? 1 : 0;
}

int at_udp_egress(struct __sk_buff *skb)
{
	if (!egress_other_proto(skb))
		return 0;
	if (!cfg(AT_CFG_UDP_INSPECT))
		return 1;
	u64 cookie = bpf_get_socket_cookie(skb);
	struct udp_sock *u = udp_socks.lookup(&cookie);
	if (!u)
		return 1;
	u8 addr[16] = {};
	u32 off;
	u16 family;
	if (skb->protocol == bpf_htons(0x0800)) {
		u8 ip[20];
		if (bpf_skb_load_bytes(skb, 0, ip, 20))
			return 1;
		if (ip[9] != IPPROTO_UDP || ip[16] == 127)
			return 1;
		/* a fragment after the first has no UDP header */
		if ((ip[6] & 0x1f) || ip[7])
			return 1;
		off = (ip[0] & 0xf) * 4;
		addr[10] = 0xff;
		addr[11] = 0xff;
		__builtin_memcpy(&addr[12], &ip[16], 4);
		family = 2;
	} else if (skb->protocol == bpf_htons(0x86DD)) {
		u8 ip6[40];
		if (bpf_skb_load_bytes(skb, 0, ip6, 40))
			return 1;
		if (ip6[6] != IPPROTO_UDP)  /* extension headers: not followed */
			return 1;
		__builtin_memcpy(addr, &ip6[24], 16);
		u64 hi, lo;
		__builtin_memcpy(&hi, &ip6[24], 8);
		__builtin_memcpy(&lo, &ip6[32], 8);
		if (hi == 0 && lo == ((u64)1 << 56))  /* ::1 */
			return 1;
		off = 40;
		family = 10;
	} else {
		return 1;
	}
	u8 uh[8];
	if (bpf_skb_load_bytes(skb, off, uh, 8))
		return 1;
	u16 sport = (uh[0] << 8) | uh[1], dport = (uh[2] << 8) | uh[3];
	u32 ulen = (uh[4] << 8) | uh[5];
	u32 len = ulen >= 8 ? ulen - 8 : 0;
	u32 verdict = 1;
	if (dport != 53) {
		if (u->sent >= AT_DGRAM_FIRST)
			return 1;
		__sync_fetch_and_add(&u->sent, 1);
	} else {
		verdict = dns_label_verdict(skb, off + 8 + 12, len);
	}
	struct datagram_event *e = events.ringbuf_reserve(sizeof(struct datagram_event));
	if (!e) {
		count_lost(AT_EV_DATAGRAM);
		return verdict;
	}
	e->h.ktime = bpf_ktime_get_ns();
	e->h.cgroup_id = bpf_skb_cgroup_id(skb);
	e->h.kind = AT_EV_DATAGRAM;
	e->h.pid = u->pid;
	e->h.tid = u->pid;
	e->h.uid = 0;
	__builtin_memcpy(e->h.comm, u->comm, AT_COMM_LEN);
	e->cookie = cookie;
	e->slot = u->slot;
	e->len = len;
	e->family = family;
	e->dport = dport;
	e->sport = sport;
	__builtin_memcpy(e->addr, addr, 16);
	u32 n = len > AT_DGRAM_CAP ? AT_DGRAM_CAP : len;
	u32 payload = off + 8;
	if (n) {
		/* (n - 1) bounded, + 1: the verifier sees a read of 1..CAP bytes */
		u32 m = (n - 1) & 0x1ff;
		if (m >= AT_DGRAM_CAP)
			m = AT_DGRAM_CAP - 1;
		if (bpf_skb_load_bytes(skb, payload, e->data, m + 1))
			n = 0;
	}
	e->captured = n;
	e->flags = verdict ? 0 : AT_DGRAM_DROPPED;
	e->_pad = 0;
	count(AT_CNT_DATAGRAMS);
	events.ringbuf_submit(e, 0);
	return verdict;
}

#endif
