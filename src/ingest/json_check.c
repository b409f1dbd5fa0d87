/*-------------------------------------------------------------------------
 *
 * json_check.c
 *	  JSON validation for ingest with jansson: a parse that reports errors as
 *	  values (line, column, reason) instead of raising, so one bad message
 *	  becomes a dead letter without a subtransaction.  Kept in its own file
 *	  because jansson's json_object() clashes with PostgreSQL's fmgr symbol.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <jansson.h>

#include "ingest/json_check.h"

/*
 * Is data[0..len) one JSON document?  On failure, writes the reason into
 * errbuf.  Integers are read as reals so that big numbers (which jsonb keeps
 * as numeric) are not rejected.
 */
bool
spool_json_valid(const char *data, size_t len, char *errbuf, size_t errlen)
{
	json_error_t err;
	json_t	   *doc = json_loadb(data, len, JSON_DECODE_ANY | JSON_DECODE_INT_AS_REAL, &err);

	if (doc == NULL)
	{
		snprintf(errbuf, errlen, "%s (line %d, column %d)", err.text, err.line, err.column);
		return false;
	}
	json_decref(doc);
	return true;
}
