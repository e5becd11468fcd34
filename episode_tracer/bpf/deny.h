/* agent-tracer connect / sendmsg deny: cgroup sock_addr programs matching the policy's
 * LPM tries and port maps, double-buffered by generation.
 * Included by tracer.c only (one compilation unit for bcc). */
#ifndef AT_DENY_H
#define AT_DENY_H

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
	/* the identity's own mask; an identity without one (an ended episode's
	 * leftover process, or a mask not written yet) gets the rules of every
	 * episode (identity 0), never none */
	u32 ident = (u32)slot & AT_IDENT_MASK;
	u32 key = (gen << 24) | ident;
	u64 *m = slot_mask.lookup(&key);
	if (!m && ident) {
		count(AT_CNT_SLOT_STALE);
		key = gen << 24;
		m = slot_mask.lookup(&key);
	}
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

/* egress mode (episode_tracer/bpf/egress.h) first: it refuses, redirects DNS to the stub
 * (the rewritten destination is the stub's: no deny rule and no wire
 * inspection applies), or passes to the wire flow learning (wire_learn,
 * episode_tracer/bpf/wire.h: the flow of an episode's TCP connect, by cookie; a full flow
 * map refuses the connect) and the deny rules; UDP sockets of episodes are
 * noted for the datagram inspection (episode_tracer/bpf/udp.h) */
static __always_inline int sock_addr_check(struct bpf_sock_addr *ctx, int v6, u32 sendmsg)
{
	udp_note(ctx);
	int eg = egress_check(ctx, v6, sendmsg);
	if (eg == AT_EGRESS_REDIRECTED)
		return 1;
	if (eg != AT_EGRESS_PASS)
		return 0;
	if (!sendmsg && wire_learn(ctx) < 0)
		return 0;
	return deny_check(ctx, v6, sendmsg ? AT_DENY_SENDMSG : 0);
}

int at_connect4(struct bpf_sock_addr *ctx) { return sock_addr_check(ctx, 0, 0); }
int at_connect6(struct bpf_sock_addr *ctx) { return sock_addr_check(ctx, 1, 0); }
int at_sendmsg4(struct bpf_sock_addr *ctx) { return sock_addr_check(ctx, 0, 1); }
int at_sendmsg6(struct bpf_sock_addr *ctx) { return sock_addr_check(ctx, 1, 1); }

#endif
