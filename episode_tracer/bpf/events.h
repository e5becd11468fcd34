/* agent-tracer: the one definition of every record the kernel sends to user
 * space over the ring buffer, and of the keys of the maps user space writes.
 *
 * Python decodes these with layouts in episode_tracer/events.py; tests/test_layout.py
 * compiles this header with the C compiler and checks every offset and size
 * against them, so the two can never drift.
 *
 * Only fixed-width types; every struct is padded explicitly to 8 bytes.
 */
#ifndef AGENT_TRACER_EVENTS_H
#define AGENT_TRACER_EVENTS_H

#ifndef __u64
#include <linux/types.h>
#endif

#define AT_COMM_LEN 16
#define AT_FILENAME_LEN 256
#define AT_ARGV_MAX 32        /* argv entries captured */
#define AT_ARG_LEN 256        /* bytes read per argv entry */
#define AT_ARGV_BUF 1024      /* bytes of packed argv kept (power of two) */
#define AT_EPISODE_LEN 64     /* AGENT_EPISODE_ID value */
#define AT_SOCKADDR_LEN 112   /* enough for sockaddr_un and sockaddr_in6 */
#define AT_UNIX_PATH_LEN 108
#define AT_UNIX_KEY_LEN 112   /* sun_path (108) padded to 8 bytes */
#define AT_MEMFD_NAME_LEN 64
#define AT_OPEN_PATH_LEN 64
#define AT_GPU_PREFIX_MAX 8
/* first bytes of a new outbound TCP flow of an episode kept for judging (the
 * cgroup_skb programs of episode_tracer/bpf/wire.h accumulate them by socket cookie, in
 * sequence order, whatever syscall wrote them): a TLS ClientHello with
 * post-quantum key shares (~1.8 KB), an HTTP request with its headers, a
 * Stratum line after 2 KB of params. Bytes beyond it are not inspected. */
#define AT_WIRE_CAP 4096
#define AT_CGROUP_PATH_LEN 256 /* cgroup path below the cgroup2 root */

enum at_kind {
	AT_EV_FORK = 1,
	AT_EV_EXEC = 2,
	AT_EV_EXIT = 3,
	AT_EV_CONNECT = 4,
	AT_EV_SOCKET = 5,
	AT_EV_BIND = 6,
	AT_EV_LISTEN = 7,
	AT_EV_MEMFD = 8,
	AT_EV_GPU_OPEN = 9,
	AT_EV_DENY = 10,      /* a sock_addr program refused a connect/sendmsg */
	AT_EV_GATE_RACE = 11, /* a gated process was continued by someone else */
	AT_EV_PROTOCOL = 12,  /* first bytes of a new outbound TCP flow (cgroup_skb, by cookie) */
	AT_EV_CGROUP_MKDIR = 13, /* a cgroup2 directory was made (level >= 2): names
				    an episode cgroup before anything runs in it */
	AT_EV_ESCAPE = 18,    /* a member of an episode was moved to a cgroup outside it
				 (cgroup_attach_task): it stays a member */
	AT_EV_UNIX_DENY = 22,  /* the cgroup unix-connect program refused a connect (episode_tracer/bpf/nodesvc.h) */
	AT_EV_EGRESS = 24,    /* egress mode refused (or, monitor, would refuse) a
				 connect/sendmsg of an episode (episode_tracer/bpf/egress.h) */
	AT_EV_DATAGRAM = 25,  /* a UDP datagram of an episode socket to a non-loopback
				 host, with its first bytes (episode_tracer/bpf/udp.h, cgroup_skb) */
	AT_EV_CGROUP_RMDIR = 28, /* a cgroup2 directory (level >= 2) was removed: after
				    every record of the processes that ran in it */
	AT_EV_KIND_MAX = 29,
};

/* exec_event.flags */
#define AT_EXEC_ARGV_TRUNCATED (1u << 0)
#define AT_EXEC_ENV_MARKER (1u << 1)   /* AGENT_EPISODE_ID found in envp */
#define AT_EXEC_KILLED (1u << 2)       /* killed in the kernel (known-bad name) */
#define AT_EXEC_GATED (1u << 3)        /* stopped by the exec gate */
#define AT_EXEC_KILL_WOULD (1u << 4)   /* name on the kill list, not enforced */
#define AT_EXEC_NO_ARGV (1u << 5)      /* no syscall-entry record (out of scope at
					  execve, a 32-bit int 0x80 execve, a full
					  pending map): user space reads argv from
					  /proc/<pid>/cmdline of the stopped task */
#define AT_EXEC_GPU_RIGHT (1u << 6)    /* the process held the GPU right before this
					  exec (user space re-grants it if the
					  registration names the new executable) */

/* deny_event.user_type */
#define AT_DENY_SENDMSG (1u << 0)   /* sendmsg (else connect) */
#define AT_DENY_WOULD (1u << 1)     /* monitor mode: matched, not refused */

/* deny rule bit of the self-test's canary rule: enforced in monitor mode too */
#define AT_RULE_CANARY 63

/* episode identity (the "slot" in episode_cgroups values, tracked values and
 * slot_mask keys): 24 bits, generation << AT_SLOT_BITS | slot index.
 * Index 0 is "an episode not registered yet" (the rules of every episode);
 * indices 1..AT_EPISODES_MAX are handed out to running episodes and recycled
 * when they end, each reuse with the next generation of that index, so a
 * stale kernel entry of an ended episode never names the new one. */
#define AT_SLOT_BITS 13
#define AT_SLOT_INDEX_MASK 8191
#define AT_IDENT_MASK 16777215
#define AT_EPISODES_MAX 8190   /* concurrent episodes the kernel maps can name */
/* identity of the tracer's self-test (canary) cgroup: index 8191, which no
 * episode ever gets (indices end at AT_EPISODES_MAX); never gated by gate-all
 * (the tracer waits on its canaries synchronously) */
#define AT_SLOT_CANARY 16777215

/* tracked map value: how a process entered scope (low byte), episode identity above */
#define AT_TRACK_ENV 1
#define AT_TRACK_LINEAGE 2
#define AT_TRACK_CGROUP 3   /* joined or was forked in an episode cgroup */
#define AT_TRACK_ESCAPED 4  /* was moved out of its episode cgroup: still a member */

/* escape_event.flags */
#define AT_ESC_OUTSIDE (1u << 0)   /* the destination is outside every episode cgroup */
#define AT_ESC_BY_OTHER (1u << 1)  /* moved by another episode process (not itself) */
#define AT_ESC_UNTRACKED (1u << 2) /* was not tracked: membership taken from the mover */

/* gpu_right map values */
#define AT_GPU_RIGHT 1

/* counters (per-CPU array indices) */
enum at_counter {
	AT_CNT_GATED = 0,
	AT_CNT_GATE_RACE = 1,
	AT_CNT_EXEC_KILLED = 2,
	AT_CNT_DENIED = 3,
	AT_CNT_WIRE_HELD = 4,    /* payload packets of undecided flows dropped (held) */
	AT_CNT_WIRE_DENIED = 5,  /* packets of denied flows dropped */
	AT_CNT_WIRE_FULL = 6,    /* a flow map was full: the flow is held/denied */
	AT_CNT_WIRE_UNREPORTED = 7, /* a flow report could not be reserved (the flow
				       stays held; reported again at its next packet) */
	AT_CNT_WIRE_MIDSTREAM = 8, /* episode flows first seen without their SYN
				      (accepted, or older than the tracer): not inspected */
	AT_CNT_ESCAPES = 10,     /* episode members moved out of their episode cgroup */
	AT_CNT_EXEC_NO_ARGV = 11, /* in-scope execs without a syscall-entry record */
	AT_CNT_GPU_OPEN_KILLED = 12, /* episode processes without the GPU right killed
					at a GPU device open */
	AT_CNT_RATE_DROPPED = 14, /* records dropped by the per-episode rate limit (episode_tracer/bpf/nodesvc.h) */
	AT_CNT_UNIX_DENIED = 16,  /* unix connects refused by a unix deny rule */
	AT_CNT_UNIX_UNVERIFIED = 17, /* unix connects refused because the path could not be judged
					(arguments not seen, no verdict entry) */
	AT_CNT_UNIX_GATED = 21,  /* unix connects held (thread stopped) for user space's
				    judgement of the socket their path leads to */
	AT_CNT_EGRESS_DENIED = 18, /* connects/sendmsgs refused by egress mode */
	AT_CNT_DNS_REDIRECTED = 19, /* episode DNS connects/sendmsgs sent to the stub */
	AT_CNT_DATAGRAMS = 20,   /* datagram records sent (episode_tracer/bpf/udp.h) */
	AT_CNT_MAP_FULL = 22,     /* a kernel map update failed (full): tracked, exec_pending,
				     gated, sock_pending, thread_clones (docs/scale.md); an
				     in-scope exec or connect without its entry is held/denied */
	AT_CNT_SLOT_STALE = 23,   /* a deny decision for an identity without its own mask
				     (ended episode's leftover, or not written yet): the
				     rules of every episode applied */
	AT_CNT_MAX = 24,
};

/* config array indices (u64 values written by user space) */
enum at_config {
	AT_CFG_GEN = 0,          /* active policy generation (0 or 1) */
	AT_CFG_GATE_ALL = 1,     /* bit g: gate every in-scope exec in generation g */
	AT_CFG_RACE_ARMED = 2,   /* set by the kernel after the first SIGCONT race */
	AT_CFG_DENY_GLOBAL0 = 3, /* deny rule mask with scope=all, generation 0 */
	AT_CFG_DENY_GLOBAL1 = 4, /* ... generation 1 */
	AT_CFG_ANYPORT0 = 5,     /* deny rules without a port condition, gen 0 */
	AT_CFG_ANYPORT1 = 6,
	AT_CFG_TCP0 = 7,         /* deny rules that apply to TCP, gen 0 */
	AT_CFG_TCP1 = 8,
	AT_CFG_UDP0 = 9,         /* deny rules that apply to UDP, gen 0 */
	AT_CFG_UDP1 = 10,
	AT_CFG_EXC_ANYPORT0 = 11, /* rules whose except has no port condition */
	AT_CFG_EXC_ANYPORT1 = 12,
	AT_CFG_EPISODE_ROOT = 13, /* cgroup id of <cgroup2>/agent-tracer */
	AT_CFG_GATE_ALL_GLOBAL = 14, /* bit g: gate every exec on the node in generation g
				       (but the tracer's own process tree) */
	AT_CFG_WIRE_HOLD = 15,   /* bit g: payload of undecided episode flows is dropped
				    (held) until user space rules (episode_tracer/bpf/wire.h) */
	AT_CFG_MONITOR = 16,     /* 1: monitor mode: deny rules match but allow; an
				    unconnected UDP sendmsg they match is reported
				    (deny_event with AT_DENY_WOULD), connects are
				    reported by their own records */
	/* 17-20: other topics */
	AT_CFG_GPU_OPEN_KILL = 21, /* bit g: kill an episode process that opens a GPU
				      device without the GPU right (gpu_right map) */
	AT_CFG_EPISODE_RATE = 25, /* per-episode record rate limit: records/s in the low 32
				     bits, burst above; 0: off (episode_tracer/bpf/nodesvc.h) */
	AT_CFG_UNIX_DENY = 26,   /* bit g: unix deny rules are loaded in generation g */
	AT_CFG_EGRESS = 27,      /* bit g: some episode slot is in egress mode in generation g */
	AT_CFG_DNS_STUB_PORT = 28, /* UDP and TCP port of the tracer's DNS stub on
				      127.53.0.0/16 (0: no stub: episode DNS in egress
				      mode is refused) */
	AT_CFG_UDP_INSPECT = 29, /* 1: the cgroup_skb program reports episode datagrams */
	AT_CFG_DNS_DROP_LABEL = 30, /* byte g: an enforcing datagram rule kills DNS queries with
				       a label of this many characters or more: the packet
				       path drops them (0: off), in generation g */
	AT_CFG_MAX = 31,
};

struct event_hdr {
	__u64 ktime;
	__u64 cgroup_id;
	__u32 kind;
	__u32 pid;   /* tgid */
	__u32 tid;
	__u32 uid;
	char comm[AT_COMM_LEN];
};

/* fork_event.flags */
#define AT_FORK_UNTRACKED (1u << 0)   /* the child could not be added to `tracked` (map full) */

struct fork_event {
	struct event_hdr h;
	__u32 child_pid;
	__u32 flags;
};

struct exec_event {
	struct event_hdr h;
	__u32 flags;
	__u32 argc;      /* argv entries captured */
	__u32 args_len;  /* bytes of args used (NUL separated) */
	__u32 old_pid;
	char filename[AT_FILENAME_LEN];
	char episode[AT_EPISODE_LEN];
	char args[AT_ARGV_BUF + AT_ARG_LEN];
};

struct exit_event {
	struct event_hdr h;
	__s32 code;    /* exit_group() status, -1 when unknown */
	__s32 signal;  /* fatal signal, 0 when none */
};

/* connect and bind share one layout */
struct sock_event {
	struct event_hdr h;
	__s32 fd;
	__s32 result;
	__u32 addrlen;
	__u32 _pad;
	__u8 addr[AT_SOCKADDR_LEN];  /* raw struct sockaddr as passed */
};

struct socket_event {
	struct event_hdr h;
	__s32 family;
	__s32 type;
	__s32 protocol;
	__s32 result;
};

struct listen_event {
	struct event_hdr h;
	__s32 fd;
	__s32 backlog;
	__s32 result;
	__u32 addrlen;   /* 0 when no bind was seen on this fd */
	__u8 addr[AT_SOCKADDR_LEN];
};

struct memfd_event {
	struct event_hdr h;
	__u32 flags;
	__s32 result;
	char name[AT_MEMFD_NAME_LEN];
};

/* open_event.verdict */
#define AT_OPEN_KILLED (1u << 0)   /* no GPU right: SIGKILL sent at the open */
#define AT_OPEN_RIGHT (1u << 1)    /* the process holds the GPU right */

/* open_event.call */
#define AT_OPEN_OPENAT 0
#define AT_OPEN_OPEN 1
#define AT_OPEN_OPENAT2 2

struct open_event {
	struct event_hdr h;
	__s32 flags;
	__s32 result;
	char path[AT_OPEN_PATH_LEN];
	__u32 verdict;
	__u32 call;
};

struct deny_event {
	struct event_hdr h;
	__u64 rules;     /* mask of deny rules that matched */
	__u32 family;
	__u32 protocol;
	__u32 port;
	__u32 user_type; /* 0 connect, 1 sendmsg */
	__u8 addr[16];
};

struct gate_race_event {
	struct event_hdr h;   /* the sender */
	__u32 target;         /* gated pid that was continued */
	__u32 sig;
};

struct cgroup_event {
	struct event_hdr h;   /* the process that made the directory */
	__u64 id;             /* cgroup id (the directory's inode) */
	__s32 level;          /* depth below the cgroup2 root */
	__u32 _pad;
	char path[AT_CGROUP_PATH_LEN]; /* e.g. /agent-tracer/<ID>[/sub] */
};

struct escape_event {
	struct event_hdr h;   /* the process that wrote cgroup.procs */
	__u64 dst_id;         /* cgroup id of the destination */
	__u32 target;         /* the moved process (thread-group leader) */
	__u32 slot;           /* episode slot it stays a member of */
	__u32 flags;          /* AT_ESC_* */
	__s32 dst_level;
	char dst_path[AT_CGROUP_PATH_LEN]; /* below the cgroup2 root */
};

/* wire_event.flags */
#define AT_WIRE_HELD (1u << 0)     /* the packet that brought these bytes was dropped (held) */
#define AT_WIRE_SYN_DATA (1u << 1) /* bytes came in the SYN (TCP Fast Open) */
#define AT_WIRE_FULL (1u << 2)     /* captured reached AT_WIRE_CAP: no more bytes will come */
#define AT_WIRE_V6 (1u << 3)       /* IPv6 packet (else IPv4) */

/* A flow report: the first `captured` bytes of a TCP flow so far. The
 * kernel keeps one per undecided flow (map flow_bufs, by socket cookie) and
 * sends its head plus data[0:captured] (a variable-length record) each time
 * a packet added bytes. pid/uid/comm are the connecting process (learned by
 * the connect programs; 0 when unknown), h.cgroup_id the socket's cgroup. */
struct wire_event {
	struct event_hdr h;
	__u64 cookie;     /* socket cookie */
	__u32 captured;   /* bytes in data */
	__u32 flags;
	__u32 upto;       /* the kernel's view of the verdict: bytes allowed out */
	__u16 family;     /* AF_INET / AF_INET6 */
	__u16 port;       /* destination port, host order */
	__u16 sport;      /* source port, host order */
	__u16 _pad;
	__u32 _pad2;
	__u8 addr[16];    /* destination (IPv4 in the first 4 bytes) */
	__u8 data[2 * AT_WIRE_CAP]; /* only data[0:captured] is sent */
};
#define AT_WIRE_HEAD 96  /* offsetof(struct wire_event, data) */

/* flow_verdict value, written by user space only (key: socket cookie) */
#define AT_VERDICT_DENY (1u << 0)  /* drop every packet of the flow from now on */
#define AT_VERDICT_DONE (1u << 1)  /* decided: stop inspecting, let it all pass */
struct flow_verdict {
	__u32 upto;       /* payload bytes [0, upto) may leave; the rest is held */
	__u32 flags;
};

/* unix_deny_event.flags */
#define AT_UNIX_WOULD (1u << 0)      /* monitor mode: matched, not refused */
#define AT_UNIX_NO_ARGS (1u << 1)    /* the connect's arguments were not seen (no syscall-entry
					stash: io_uring, 32-bit socketcall, map full): refused */
#define AT_UNIX_RELATIVE (1u << 2)   /* relative path or a '..' component: refused */
#define AT_UNIX_ABSTRACT (1u << 3)   /* abstract socket (path[0] == 0; shown as '@name') */
#define AT_UNIX_GATE (1u << 4)       /* a gate record, not a refusal: the connecting thread is
					stopped at sys_enter_connect until user space writes its
					unix_verdict (rules: 0) */

/* a unix connect the cgroup unix-connect program refused (or matched in
 * monitor mode); path is the canonical form it was judged by ('//' and '/./'
 * squeezed), NUL padded */
struct unix_deny_event {
	struct event_hdr h;
	__u64 rules;      /* mask of unix deny rules that matched */
	__u32 flags;
	__u32 pathlen;    /* bytes of path used (abstract names may hold NULs) */
	__u32 hash;       /* FNV-1a 32 of all of path, NUL padded (names the connect a verdict is for) */
	__u32 _pad;
	__u8 path[AT_UNIX_KEY_LEN];
};

/* unix_verdicts value (key: thread id): a pathname connect of an episode
 * whose text alone cannot clear it (the text does not name the socket:
 * symlinks, relative paths, bind mounts) is judged by user space on the
 * resolved target while the thread is stopped; the connect restarts and
 * takes the verdict whose hash is its path's. Written: PENDING by the
 * kernel, ALLOW/DENY by user space; deleted by the kernel when used. */
#define AT_UNIX_V_PENDING 0
#define AT_UNIX_V_ALLOW 1
#define AT_UNIX_V_DENY 2
struct unix_verdict {
	__u32 state;      /* AT_UNIX_V_* */
	__u32 hash;       /* FNV-1a 32 of the path text the verdict is for */
	__u64 rules;      /* DENY: mask of the unix deny rules the target fell under */
};

/* egress_event.flags */
#define AT_EGRESS_SENDMSG (1u << 0)  /* unconnected UDP sendmsg (else connect) */
#define AT_EGRESS_WOULD (1u << 1)    /* monitor mode: not refused */
#define AT_EGRESS_DNS (1u << 2)      /* port 53 to a resolver that is not the node's */
#define AT_EGRESS_LOCAL (1u << 3)    /* a loopback listener the episode does not own */
#define AT_EGRESS_PROTO (1u << 4)    /* neither TCP nor UDP */
#define AT_EGRESS_PACKET (1u << 5)   /* dropped in the packet path (raw or ICMP socket;
					pid unknown there: the socket's cgroup is in the header) */

/* the DNS stub listens on 127.53.0.0/16: episode slot S is redirected to
 * 127.53.(S >> 8).(S & 255), so the address a query arrives at names the
 * episode whose allow map the answer goes into */
#define AT_DNS_STUB_NET 0x7f350000   /* 127.53.0.0, host order */

struct egress_event {
	struct event_hdr h;
	__u32 family;
	__u32 protocol;
	__u32 port;
	__u32 flags;
	__u32 slot;      /* episode slot of the caller */
	__u32 _pad;
	__u8 addr[16];
};

/* first bytes of a datagram kept (a DNS query name is at most 255 bytes
 * after a 12-byte header; a QUIC long header is well within) */
#define AT_DGRAM_CAP 320
/* datagrams reported per socket to ports other than 53 (53: every one) */
#define AT_DGRAM_FIRST 4

struct datagram_event {
	struct event_hdr h;   /* pid/comm: the last episode process that sent on the socket */
	__u64 cookie;         /* socket cookie */
	__u32 slot;
	__u32 len;            /* UDP payload bytes */
	__u16 family;
	__u16 dport;
	__u16 sport;
	__u16 captured;
	__u32 flags;          /* AT_DGRAM_DROPPED */
	__u32 _pad;
	__u8 addr[16];        /* destination */
	__u8 data[AT_DGRAM_CAP];
};

/* datagram_event.flags */
#define AT_DGRAM_DROPPED (1u << 0)   /* dropped in the packet path (AT_CFG_DNS_DROP_LABEL) */

/* ---- keys of the policy maps (all carry the policy generation) ---- */

/* a unix socket path in the unix_deny LPM trie: an exact path's prefix
 * covers its terminating NUL, a 'prefix*' entry's only its bytes */
struct unix_path_key {
	__u32 prefixlen;  /* 32 (gen) + 8 * bytes */
	__u32 gen;
	__u8 path[AT_UNIX_KEY_LEN];
};


struct comm_key {
	__u32 gen;
	char comm[AT_COMM_LEN];
};

struct lpm4_key {
	__u32 prefixlen; /* 32 (gen) + cidr bits */
	__u32 gen;
	__u8 addr[4];
};

struct lpm6_key {
	__u32 prefixlen; /* 32 (gen) + cidr bits */
	__u32 gen;
	__u8 addr[16];
};

/* egress_dyn: an address an episode slot may reach until the value (ktime
 * ns): written by the DNS stub from answers. IPv4 as ::ffff:a.b.c.d */
struct egress_dyn_key {
	__u32 slot;
	__u32 _pad;
	__u8 addr[16];
};

/* a path prefix as 8-byte words and the mask of the bytes that count:
 * path matches when (word[i] & mask[i]) == prefix word[i] for every i */
struct gpu_prefix {
	__u64 word[AT_OPEN_PATH_LEN / 8];
	__u64 mask[AT_OPEN_PATH_LEN / 8];
};

#endif
