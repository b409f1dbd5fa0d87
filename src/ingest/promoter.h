/*-------------------------------------------------------------------------
 *
 * promoter.h
 *	  Private to the promoter's files (promoter.c, promote_insert.c): the
 *	  multi-insert promotion of staged messages.  Not a door.
 *
 *-------------------------------------------------------------------------
 */
#ifndef SPOOL_PROMOTER_H
#define SPOOL_PROMOTER_H

#include "utils/relcache.h"

/* promote_insert.c */
extern bool spool_promote_messages(Relation staging, int64 next, int64 nmsg,
								   int64 *inserted);

#endif							/* SPOOL_PROMOTER_H */
