/*-------------------------------------------------------------------------
 *
 * internal_lock.c
 *	  Session locks that no SQL call can take, hold or release.
 *
 *	  pg_advisory_lock(a, b) and pg_advisory_lock(k) make LOCKTAG_ADVISORY
 *	  tags with field4 = 2 or 1, so any role that guessed our numbers could
 *	  hold a worker's lock and stall it.  Our tags are LOCKTAG_USERLOCK (a
 *	  type PostgreSQL reserves and no function produces), keyed by database,
 *	  a hash of the object's name, a number, and the kind.
 *
 *	  They live in the user lock method, so pg_advisory_unlock_all() in user
 *	  code running inside a worker would release them too: the box calls
 *	  spool_internal_locks_recheck() when it closes, which takes back a lock
 *	  that vanished, or ends the worker if another process took it meanwhile.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/hashfn.h"
#include "miscadmin.h"
#include "storage/lock.h"

#include "core/core.h"

#define MAX_HELD 4

static LOCKTAG held[MAX_HELD];
static int	nheld = 0;

static void
make_tag(LOCKTAG *tag, SpoolLockKind kind, const char *name, uint32 key)
{
	memset(tag, 0, sizeof(LOCKTAG));
	tag->locktag_field1 = MyDatabaseId;
	tag->locktag_field2 = hash_bytes((const unsigned char *) name, strlen(name));
	tag->locktag_field3 = key;
	tag->locktag_field4 = (uint16) kind;
	tag->locktag_type = LOCKTAG_USERLOCK;
	tag->locktag_lockmethodid = USER_LOCKMETHOD;
}

/*
 * Take the exclusive session lock (kind, name, key) without waiting; false
 * if another process holds it.  Held until spool_internal_unlock or exit.
 */
bool
spool_internal_lock(SpoolLockKind kind, const char *name, uint32 key)
{
	LOCKTAG		tag;

	make_tag(&tag, kind, name, key);
	if (LockAcquire(&tag, ExclusiveLock, true, true) == LOCKACQUIRE_NOT_AVAIL)
		return false;
	if (nheld < MAX_HELD)
		held[nheld++] = tag;
	return true;
}

void
spool_internal_unlock(SpoolLockKind kind, const char *name, uint32 key)
{
	LOCKTAG		tag;
	int			i;

	make_tag(&tag, kind, name, key);
	(void) LockRelease(&tag, ExclusiveLock, true);
	for (i = 0; i < nheld; i++)
		if (memcmp(&held[i], &tag, sizeof(LOCKTAG)) == 0)
		{
			held[i] = held[--nheld];
			break;
		}
}

/*
 * After user code ran in this process: every lock we hold is still ours.
 * One it released is taken back; if another process got it meanwhile, this
 * process can no longer be sure it is the only one, and exits.
 */
void
spool_internal_locks_recheck(void)
{
	int			i;

	for (i = 0; i < nheld; i++)
	{
		if (LockHeldByMe(&held[i], ExclusiveLock))
			continue;
		if (LockAcquire(&held[i], ExclusiveLock, true, true) == LOCKACQUIRE_NOT_AVAIL)
			ereport(FATAL,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("user code released an internal lock of this worker, and another process took it"),
					 errhint("Handlers and target functions must not call pg_advisory_unlock_all().")));
		ereport(WARNING,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("user code released an internal lock of this worker; it was taken back"),
				 errhint("Handlers and target functions must not call pg_advisory_unlock_all().")));
	}
}
