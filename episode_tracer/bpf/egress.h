/* agent-tracer egress mode: default-deny egress for episodes in an [[egress]]
 * profile, the DNS redirect to the tracer's stub resolver (connect4/6,
 * sendmsg4/6 rewrite the destination, recvmsg4/6 rewrite the source back),
 * and the owners of local listeners (post_bind4/6).
 * Called from the sock_addr programs of deny.h before the deny rules.
 * Included by tracer.c only (one compilation unit for bcc).
 *
 * Maps of this topic (declared here, next to their only users):
 *   egress_slot    gen<<24|identity -> bit of the episode's egress profile (0..63);
 *                  absent: not in egress mode (an identity without its own
 *                  slot_mask, an ended episode's leftover, gets identity 0's
 *                  posture: egress_profile()). Loop thread.
 *   egress_allow4/6 LPM (gen, cidr) -> mask of profiles allowing it (any port).
 *                  Loop thread, by generation with the deny maps.
 *   egress_port    gen<<16|port -> mask of profiles allowing that port to any
 *                  destination. Loop thread.
 *   egress_local   gen<<16|port -> mask of profiles allowing a loopback listener
 *                  on that port that the episode does not own. Loop thread.
 *   egress_dyn     (identity, addr) -> ktime ns until which the episode may reach addr
 *                  (any port): ONLY the DNS stub thread writes it (answers of
 *                  allowed names, with their TTL; expired entries it deletes),
 *                  the loop thread never does.
 *   dns_resolvers  (0, addr) -> 1: the node's resolvers (/etc/resolv.conf and
 *                  the stub's upstreams); port 53 to these is redirected to
 *                  the stub, port 53 to anything else refused. Loop thread at start.
 *   dns_orig       socket cookie -> the resolver a redirected socket asked
 *                  (recvmsg rewrites the stub's answers back to it). Kernel.
 *   listen_owner   proto<<16|port -> identity+1 of the episode that bound it, 0 a
 *                  process outside episodes (last bind wins). Kernel (post_bind).
 */
#ifndef AT_EGRESS_H
#define AT_EGRESS_H

BPF_HASH(egress_slot, u32, u64, 32768);
BPF_LPM_TRIE(egress_allow4, struct lpm4_key, u64, 8192);
BPF_LPM_TRIE(egress_allow6, struct lpm6_key, u64, 8192);
BPF_HASH(egress_port, u32, u64, 65536);
BPF_HASH(egress_local, u32, u64, 65536);
BPF_HASH(egress_dyn, struct egress_dyn_key, u64, 65536);
BPF_HASH(dns_resolvers, struct egress_dyn_key, u8, 64);
struct dns_orig {
	u32 ip[4];   /* IPv4: ip[0]; IPv6 (or mapped): all four */
	u32 port;    /* network order */
	u32 v6;
};
BPF_TABLE("lru_hash", u64, struct dns_orig, dns_orig, 16384);
BPF_HASH(listen_owner, u32, u32, 131072);  /* every TCP and UDP port: never full */

#define AT_EGRESS_PASS 1     /* not egress's business (or allowed): the deny rules decide */
#define AT_EGRESS_REFUSE 0
#define AT_EGRESS_REDIRECTED 2

/* episode identity of the current task (cgroup, else env/lineage tracking), or -1 */
static __always_inline int task_slot(void)
{
	int slot = cgroup_slot();
	if (slot >= 0)
		return slot;
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	u32 *t = tracked.lookup(&tgid);
	if (!t)
		return -1;
	return (int)((*t >> 8) & AT_IDENT_MASK);
}

/* the egress profile bit of identity `slot` in generation gen, or 0 (not in
 * egress mode). An identity without its own slot_mask (an ended episode's
 * leftover process, or one not registered yet) gets identity 0's posture,
 * like the deny rules (deny.h): never none while profiles exist. */
static __always_inline u64 *egress_profile(u32 gen, int slot)
{
	u32 ident = (u32)slot & AT_IDENT_MASK;
	u32 k = (gen << 24) | ident;
	u64 *pm = egress_slot.lookup(&k);
	if (!pm && ident && !slot_mask.lookup(&k)) {
		k = gen << 24;
		pm = egress_slot.lookup(&k);
	}
	return pm;
}

static __always_inline void egress_report(u32 family, u32 proto, u32 port, u32 flags, int slot, const u8 *addr)
{
	struct egress_event *e = events.ringbuf_reserve(sizeof(struct egress_event));
	if (!e) {
		count_lost(AT_EV_EGRESS);
		return;
	}
	fill_hdr(&e->h, AT_EV_EGRESS);
	e->family = family;
	e->protocol = proto;
	e->port = port;
	e->flags = flags;
	e->slot = (u32)slot;
	e->_pad = 0;
	__builtin_memcpy(e->addr, addr, 16);
	events.ringbuf_submit(e, 0);
}

/* refuse (or, monitor mode, report and allow) */
static __always_inline int egress_refuse(u32 family, u32 proto, u32 port, u32 flags, int slot, const u8 *addr)
{
	u32 would = cfg(AT_CFG_MONITOR) ? AT_EGRESS_WOULD : 0;
	if (!would)
		count(AT_CNT_EGRESS_DENIED);
	egress_report(family, proto, port, flags | would, slot, addr);
	return would ? AT_EGRESS_PASS : AT_EGRESS_REFUSE;
}

static __always_inline int is_stub4(u32 ip_n)
{
	return (bpf_ntohl(ip_n) & 0xffff0000) == AT_DNS_STUB_NET;
}

/* redirect to the stub: 127.53.(index >> 8).(index & 255):stub_port (the
 * identity's slot index: the stub knows which identity holds it), the
 * original resolver kept by socket cookie for recvmsg */
static __always_inline void dns_redirect(struct bpf_sock_addr *ctx, int v6, u32 ip4_n, int slot, u32 stub_port)
{
	struct dns_orig o = {};
	o.port = ctx->user_port;
	if (v6 == 1) {
		o.ip[0] = ctx->user_ip6[0];
		o.ip[1] = ctx->user_ip6[1];
		o.ip[2] = ctx->user_ip6[2];
		o.ip[3] = ctx->user_ip6[3];
		o.v6 = 1;
	} else {
		o.ip[0] = ip4_n;
		o.v6 = v6;   /* 2: an inet6 socket asking a mapped IPv4 resolver */
	}
	u64 cookie = bpf_get_socket_cookie(ctx);
	dns_orig.update(&cookie, &o);
	u32 stub = bpf_htonl(AT_DNS_STUB_NET | ((u32)slot & AT_SLOT_INDEX_MASK));
	if (v6) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
		ctx->user_ip6[3] = stub;
	} else {
		ctx->user_ip4 = stub;
	}
	ctx->user_port = bpf_htons((u16)stub_port);
	count(AT_CNT_DNS_REDIRECTED);
}

/* v6: 0 inet, 1 inet6 (mapped addresses are v6 == 2 and checked as IPv4) */
static __always_inline int egress_check(struct bpf_sock_addr *ctx, int v6, u32 sendmsg)
{
	u32 gen = (u32)cfg(AT_CFG_GEN) & 1;
	u64 on = cfg(AT_CFG_EGRESS) & (1ULL << gen);
	u32 stub_port = (u32)cfg(AT_CFG_DNS_STUB_PORT);
	if (!on && !stub_port)
		return AT_EGRESS_PASS;
	u32 ip4 = 0;
	if (v6 && ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 && ctx->user_ip6[2] == bpf_htonl(0x0000ffff))
		v6 = 2;
	if (!v6)
		ip4 = ctx->user_ip4;
	else if (v6 == 2)
		ip4 = ctx->user_ip6[3];
	int slot = task_slot();
	if (slot < 0)
		return AT_EGRESS_PASS;
	/* the stub's addresses are reached only through the redirect: an
	 * episode asking another slot's address directly would fill that
	 * slot's allow map */
	u32 port = bpf_ntohs((u16)ctx->user_port);
	u8 addr[16] = {};
	if (v6 == 1) {
		u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1], a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];
		__builtin_memcpy(&addr[0], &a0, 4);
		__builtin_memcpy(&addr[4], &a1, 4);
		__builtin_memcpy(&addr[8], &a2, 4);
		__builtin_memcpy(&addr[12], &a3, 4);
	} else {
		addr[10] = 0xff;
		addr[11] = 0xff;
		__builtin_memcpy(&addr[12], &ip4, 4);
	}
	u32 family = v6 == 1 ? 10 : 2;
	u32 proto = ctx->protocol;
	u32 flags = sendmsg ? AT_EGRESS_SENDMSG : 0;
	if (v6 != 1 && stub_port && is_stub4(ip4))
		return egress_refuse(family, proto, port, flags | AT_EGRESS_DNS, slot, addr);
	if (!on)
		return AT_EGRESS_PASS;
	u64 *pm = egress_profile(gen, slot);
	if (!pm)
		return AT_EGRESS_PASS;
	u64 prof = *pm;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return egress_refuse(family, proto, port, flags | AT_EGRESS_PROTO, slot, addr);
	if (port == 53) {
		struct egress_dyn_key rk = {};
		__builtin_memcpy(rk.addr, addr, 16);
		if (stub_port && v6 != 1 && dns_resolvers.lookup(&rk)) {
			dns_redirect(ctx, v6, ip4, slot, stub_port);
			return AT_EGRESS_REDIRECTED;
		}
		/* a resolver that is not the node's (or an IPv6 one: the stub
		 * listens on IPv4 loopback only) */
		return egress_refuse(family, proto, port, flags | AT_EGRESS_DNS, slot, addr);
	}
	int loopback;
	if (v6 == 1)
		loopback = ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 && ctx->user_ip6[2] == 0 &&
			   (ctx->user_ip6[3] == bpf_htonl(1) || ctx->user_ip6[3] == 0);
	else
		loopback = (bpf_ntohl(ip4) >> 24) == 127 || ip4 == 0;
	if (loopback) {
		u32 lk = (proto << 16) | port;
		u32 *owner = listen_owner.lookup(&lk);
		if (owner && *owner == (u32)slot + 1)
			return AT_EGRESS_PASS;
		u32 pk = (gen << 16) | port;
		u64 *lm = egress_local.lookup(&pk);
		if (lm && (*lm & prof))
			return AT_EGRESS_PASS;
		return egress_refuse(family, proto, port, flags | AT_EGRESS_LOCAL, slot, addr);
	}
	u64 *m;
	if (v6 == 1) {
		struct lpm6_key lk6 = {.prefixlen = 32 + 128, .gen = gen};
		__builtin_memcpy(lk6.addr, addr, 16);
		m = egress_allow6.lookup(&lk6);
	} else {
		struct lpm4_key lk4 = {.prefixlen = 32 + 32, .gen = gen};
		__builtin_memcpy(lk4.addr, &ip4, 4);
		m = egress_allow4.lookup(&lk4);
	}
	if (m && (*m & prof))
		return AT_EGRESS_PASS;
	u32 pk = (gen << 16) | port;
	u64 *ap = egress_port.lookup(&pk);
	if (ap && (*ap & prof))
		return AT_EGRESS_PASS;
	struct egress_dyn_key dk = {.slot = (u32)slot & AT_IDENT_MASK};
	__builtin_memcpy(dk.addr, addr, 16);
	u64 *until = egress_dyn.lookup(&dk);
	if (until && *until > bpf_ktime_get_ns())
		return AT_EGRESS_PASS;
	return egress_refuse(family, proto, port, flags, slot, addr);
}

/* the stub's answer appears to come from the resolver the client asked */
static __always_inline int dns_unredirect(struct bpf_sock_addr *ctx, int v6)
{
	u32 stub_port = (u32)cfg(AT_CFG_DNS_STUB_PORT);
	if (!stub_port || ctx->user_port != bpf_htons((u16)stub_port))
		return 1;
	u32 ip4;
	if (v6) {
		if (ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0 || ctx->user_ip6[2] != bpf_htonl(0x0000ffff))
			return 1;
		ip4 = ctx->user_ip6[3];
	} else {
		ip4 = ctx->user_ip4;
	}
	if (!is_stub4(ip4))
		return 1;
	u64 cookie = bpf_get_socket_cookie(ctx);
	struct dns_orig *o = dns_orig.lookup(&cookie);
	if (!o)
		return 1;
	if (v6) {
		if (o->v6 == 1) {
			ctx->user_ip6[0] = o->ip[0];
			ctx->user_ip6[1] = o->ip[1];
			ctx->user_ip6[2] = o->ip[2];
			ctx->user_ip6[3] = o->ip[3];
		} else {
			ctx->user_ip6[3] = o->ip[0];
		}
	} else {
		ctx->user_ip4 = o->ip[0];
	}
	ctx->user_port = o->port;
	return 1;
}

int at_recvmsg4(struct bpf_sock_addr *ctx) { return dns_unredirect(ctx, 0); }
int at_recvmsg6(struct bpf_sock_addr *ctx) { return dns_unredirect(ctx, 1); }

/* who owns a local port: the last bind wins (an outside process binding a
 * port an episode once had takes it back) */
static __always_inline int post_bind(struct bpf_sock *sk)
{
	u32 port = sk->src_port;
	u32 proto = sk->protocol;
	if (!port || (proto != IPPROTO_TCP && proto != IPPROTO_UDP))
		return 1;
	u32 key = (proto << 16) | (port & 0xffff);
	int slot = task_slot();
	u32 owner = slot >= 0 ? (u32)slot + 1 : 0;
	listen_owner.update(&key, &owner);
	return 1;
}

int at_post_bind4(struct bpf_sock *sk) { return post_bind(sk); }
int at_post_bind6(struct bpf_sock *sk) { return post_bind(sk); }

#endif
