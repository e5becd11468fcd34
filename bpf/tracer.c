/* agent-tracer kernel side, compiled by bcc at start.
 *
 * Tracepoints and cgroup sock_addr programs only; the only structs read are
 * tracepoint fields, helper results and uapi sockaddrs (design.md).
 *
 * Settings come from the loader as -D flags:
 *   AT_SCOPE_ALL      1: every process emits; 0: only processes in an episode
 *   AT_EPISODE_LEVEL  cgroup level of <cgroup2>/agent-tracer/<ID> (0: off)
 *   AT_RINGBUF_PAGES  ring buffer size in pages (power of two)
 *   AT_ENV_MARKER     1: look for AGENT_EPISODE_ID= in envp at execve
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
#define AT_ENV_SCAN_MAX 96
#define AT_SIGSTOP 19
#define AT_SIGKILL 9
#define AT_SIGCONT 18
#define AT_CLONE_THREAD 0x00010000

/* topic headers, in dependency order: maps first, then helpers, then the
 * programs of each topic */
#include "maps.h"
#include "common.h"
#include "process.h"
#include "sockets.h"
#include "gpu.h"
#include "egress.h"
#include "udp.h"
#include "deny.h"
#include "wire.h"
