/*-------------------------------------------------------------------------
 *
 * retention.h
 *	  The door to src/retention: removing old rows of the tables that only
 *	  grow (history.c) and reporting or dropping spool consumers that hold
 *	  segments back for too long (stale.c).  Both run inside the promoter,
 *	  which already owns segment retention.
 *
 *-------------------------------------------------------------------------
 */
#ifndef SPOOL_RETENTION_H
#define SPOOL_RETENTION_H

#include "core/core.h"

/* history.c */
extern bool spool_history_begin(void);
extern bool spool_history_step(void);

/* stale.c */
extern void spool_stale_consumers(void);

#endif							/* SPOOL_RETENTION_H */
