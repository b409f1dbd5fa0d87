/*-------------------------------------------------------------------------
 *
 * launcher.h
 *	  The door to src/launcher: the static background worker that starts
 *	  and supervises every other worker of spool_ext (launcher.c), and the
 *	  hook that sees DROP EXTENSION spool_ext (drop.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef SPOOL_LAUNCHER_H
#define SPOOL_LAUNCHER_H

extern void spool_register_launcher(void);
extern void spool_register_drop_hook(void);

#endif							/* SPOOL_LAUNCHER_H */
