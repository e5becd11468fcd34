/* agent-tracer episode lifecycle in the kernel's own order: cgroup_rmdir.
 * (cgroup_mkdir, which names a new episode cgroup, is in process.h.)
 * Included by tracer.c only (one compilation unit for bcc). */
#ifndef AT_EPISODES_H
#define AT_EPISODES_H

/* A cgroup2 directory below the top level was removed. A cgroup can only be
 * removed once nothing runs in it, so this record is in the ring buffer after
 * every record of every process that ran there: user space ends an episode
 * and forgets its cgroup ids here, in stream order, never from a directory
 * scan that may run ahead of records still queued (the attribution race of
 * many short episodes started at once). Same filter and layout as mkdir. */
TRACEPOINT_PROBE(cgroup, cgroup_rmdir)
{
	if (args->root != 0 || args->level < 2)
		return 0;
	RESERVE(e, struct cgroup_event, AT_EV_CGROUP_RMDIR);
	e->id = args->id;
	e->level = args->level;
	e->_pad = 0;
	TP_DATA_LOC_READ_STR(e->path, path, AT_CGROUP_PATH_LEN);
	events.ringbuf_submit(e, 0);
	return 0;
}

#endif
