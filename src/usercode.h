/*-------------------------------------------------------------------------
 *
 * usercode.h
 *	  The one place where user code runs: processor handlers and sql target
 *	  functions, inside a box (usercode.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef SPOOL_USERCODE_H
#define SPOOL_USERCODE_H

#include "postgres.h"

typedef struct SpoolBox
{
	Oid			save_user;
	int			save_sec;
	int			nestlevel;
	bool		open;
} SpoolBox;

extern void spool_box_open(SpoolBox *box, Oid role, bool read_only);
extern void spool_box_close(SpoolBox *box);
extern void spool_box_abandon(SpoolBox *box);

#endif							/* SPOOL_USERCODE_H */
