/* agent-tracer maps: every BPF map of the kernel side, each declared once here with
 * what it holds (key -> value), who writes it and who reads it.
 * Included by tracer.c only (one compilation unit for bcc). */
#ifndef AT_MAPS_H
#define AT_MAPS_H

/* Pinned maps (docs/faults.md): with AT_PIN_DIR (a bpffs directory, set by
 * the loader) every map below is created and pinned at AT_PIN_DIR/<name>,
 * or, when that pin exists (a previous instance of the same layout
 * version), the pinned map is reused: the kernel state survives the tracer
 * process. bcc's pinned form is its table type "type:path"; the table
 * macros are redefined so every declaration here takes it. */
#ifdef AT_PIN_DIR
#define AT_PIN(_name) ":" AT_PIN_DIR "/" #_name
#else
#define AT_PIN(_name) ""
#endif
#undef BPF_TABLE
#define BPF_TABLE(_table_type, _key_type, _leaf_type, _name, _max_entries) \
  BPF_F_TABLE(_table_type AT_PIN(_name), _key_type, _leaf_type, _name, _max_entries, 0)
#undef BPF_LPM_TRIE4
#define BPF_LPM_TRIE4(_name, _key_type, _leaf_type, _size) \
  BPF_F_TABLE("lpm_trie" AT_PIN(_name), _key_type, _leaf_type, _name, _size, BPF_F_NO_PREALLOC)
/* bcc's BPF_RINGBUF_OUTPUT with the pinned section */
#undef BPF_RINGBUF_OUTPUT
#define BPF_RINGBUF_OUTPUT(_name, _num_pages) \
struct _name##_table_t { \
  int key; \
  u32 leaf; \
  int (*ringbuf_output) (void *, u64, u64); \
  void* (*ringbuf_reserve) (u64); \
  void (*ringbuf_discard) (void *, u64); \
  void (*ringbuf_submit) (void *, u64); \
  u32 max_entries; \
}; \
__attribute__((section("maps/ringbuf" AT_PIN(_name)))) \
struct _name##_table_t _name = { .max_entries = ((_num_pages) * PAGE_SIZE) }

BPF_RINGBUF_OUTPUT(events, AT_RINGBUF_PAGES);
BPF_PERCPU_ARRAY(lost, u64, AT_EV_KIND_MAX);
BPF_PERCPU_ARRAY(counters, u64, AT_CNT_MAX);
BPF_ARRAY(config, u64, AT_CFG_MAX);

/* scope: episode cgroups (cgroup id -> episode identity, events.h) and
 * tracked processes (tgid -> source | identity << 8; source AT_TRACK_*: every
 * member of an episode cgroup is tracked too, so that it stays a member when
 * moved out, see membership.h). Sizes: docs/scale.md. */
BPF_HASH(episode_cgroups, u64, u32, 32768);
BPF_HASH(tracked, u32, u32, 262144);

/* in-flight syscalls of in-scope threads */
BPF_HASH(exec_pending, u32, struct exec_event, 2048);
BPF_PERCPU_ARRAY(exec_scratch, struct exec_event, 1);
struct sock_args {
	u64 uaddr;
	s32 fd;
	u32 addrlen;
	s32 a2;   /* socket: type, listen: backlog, memfd: flags */
	s32 a3;   /* socket: protocol */
};
BPF_HASH(sock_pending, u32, struct sock_args, 8192);
BPF_HASH(thread_clones, u32, u8, 8192);
struct bound_addr {
	u32 addrlen;
	u8 addr[AT_SOCKADDR_LEN];
};
BPF_TABLE("lru_hash", u64, struct bound_addr, bound_fds, 16384);
struct exit_info {
	s32 code;
	s32 signal;
};
BPF_HASH(exit_info, u32, struct exit_info, 65536);
BPF_PERCPU_ARRAY(sock_scratch, struct bound_addr, 1);
/* TCP flows of episodes, by socket cookie (episode_tracer/bpf/wire.h). `flows`: every
 * flow the wire programs look at (learned at connect for in-scope processes,
 * or at the SYN of a socket in an episode cgroup); a plain hash, never LRU,
 * so a held or denied flow is never evicted; full -> the new episode flow is
 * refused (counted). Entries of passed flows go at socket release; held or
 * denied ones stay until user space sees the socket gone (orphaned sockets
 * still send). `flow_verdict`: user space's verdict. `flow_bufs`: the first
 * bytes of undecided flows (a report each, sent from the map value).
 * `flow_held`: undecided flows whose payload is being dropped -> since when
 * (ns), for the verdict timeout. `wire_zero`: a zeroed report to insert. */
#define AT_FLOW_NEW 0      /* learned at connect, no SYN seen yet */
#define AT_FLOW_INSPECT 1  /* undecided: bytes accumulated and reported */
#define AT_FLOW_PASS 2     /* decided (or not ours to inspect): every packet passes */
#define AT_FLOW_DENY 3     /* denied: every packet is dropped */
#define AT_FLOW_RELEASED (1u << 0)  /* flow.flags: the socket was closed (maybe orphaned) */
struct flow {
	u64 first_ns;
	u64 cgroup_id;
	u32 state;
	u32 seq0;      /* sequence number of payload byte 0 */
	u32 tgid;
	u32 uid;
	u32 upto;      /* payload bytes allowed out (from flow_verdict) */
	u32 filled;    /* bytes in flow_bufs */
	u32 reported;  /* bytes in the last report that went out */
	u32 flags;
	char comm[AT_COMM_LEN];
};
BPF_HASH(flows, u64, struct flow, 65536);
BPF_HASH(flow_verdict, u64, struct flow_verdict, 65536);
BPF_F_TABLE("hash" AT_PIN(flow_bufs), u64, struct wire_event, flow_bufs, 4096, BPF_F_NO_PREALLOC);
BPF_HASH(flow_held, u64, u64, 4096);
BPF_ARRAY(wire_zero, struct wire_event, 1);

/* enforcement maps, double-buffered by generation */
BPF_HASH(kill_comms, struct comm_key, u8, 4096);   /* value: 1 episodes, 2 all */
BPF_HASH(gate_comms, struct comm_key, u8, 4096);
BPF_HASH(gated, u32, u32, 4096);                   /* 1 held, 2 continued by someone else */
/* the tracer's own process tree (tgids): never gated outside episodes, so the
 * tracer cannot wait on a child that waits on the tracer. User space puts
 * its tgid here; children are added at clone, removed at exit. */
BPF_HASH(self_tree, u32, u8, 4096);
BPF_HASH(slot_mask, u32, u64, 32768);              /* gen<<24|identity -> deny rule mask */
BPF_LPM_TRIE(deny4, struct lpm4_key, u64, 8192);
BPF_LPM_TRIE(deny6, struct lpm6_key, u64, 8192);
BPF_LPM_TRIE(exc4, struct lpm4_key, u64, 8192);
BPF_LPM_TRIE(exc6, struct lpm6_key, u64, 8192);
BPF_HASH(deny_port, u32, u64, 65536);              /* gen<<16|port -> mask */
BPF_HASH(exc_port, u32, u64, 65536);
BPF_ARRAY(gpu_prefixes, struct gpu_prefix, AT_GPU_PREFIX_MAX);
/* the GPU right (tgid -> AT_GPU_RIGHT): granted by user space to an
 * episode's registered GPU process (and to an exec of an executable its
 * registration names), inherited at fork, dropped at exec and exit; with
 * AT_CFG_GPU_OPEN_KILL an episode process without it is killed at a GPU
 * device open (episode_tracer/bpf/gpu.h) */
BPF_HASH(gpu_right, u32, u32, 16384);

#endif
