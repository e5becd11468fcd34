/* agent-tracer kernel side, compiled by bcc at start.
 *
 * Tracepoints, cgroup sock_addr, cgroup_skb and cgroup sock programs only; the only structs read are
 * tracepoint fields, helper results and uapi sockaddrs (design.md).
 *
 * Settings come from the loader as -D flags:
 *   AT_SCOPE_ALL      1: every process emits; 0: only processes in an episode
 *   AT_EPISODE_LEVEL  cgroup level of <cgroup2>/agent-tracer/<ID> (0: off)
 *   AT_RINGBUF_PAGES  ring buffer size in pages (power of two)
 *   AT_ENV_MARKER     1: look for AGENT_EPISODE_ID= in envp at execve
 *   AT_EPISODE_PREFIX "/agent-tracer/": the episode root's path below cgroup2
 *   AT_HAVE_GROUP_DEAD 1: sched_process_exit has group_dead (kernel 6.16+)
 */
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>
#include <linux/socket.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/un.h>
#include <linux/uio.h>
#include <asm/unistd.h>
#include "events.h"

#ifndef AT_SCOPE_ALL
#define AT_SCOPE_ALL 0
#endif
#ifndef AT_EPISODE_LEVEL
#define AT_EPISODE_LEVEL 0
#endif
#ifndef AT_RINGBUF_PAGES
#define AT_RINGBUF_PAGES 2048
#endif
#ifndef AT_ENV_MARKER
#define AT_ENV_MARKER 1
#endif
#ifndef AT_HAVE_GROUP_DEAD
#define AT_HAVE_GROUP_DEAD 0
#endif
#define AT_ENV_SCAN_MAX 96
#define AT_SIGSTOP 19
#define AT_SIGKILL 9
#define AT_SIGCONT 18
#define AT_CLONE_THREAD 0x00010000

/* topic headers, in dependency order: maps first, then helpers, then the
 * programs of each topic */
#include "maps.h"
#include "common.h"
#include "nodesvc.h"
#include "process.h"
#include "episodes.h"
#include "sockets.h"
#include "gpu.h"
#include "egress.h"
#include "udp.h"
#include "wire.h"
#include "membership.h"
#include "deny.h"
