/*-------------------------------------------------------------------------
 *
 * handler.c
 *	  The handler interface of processors: which native handlers exist and
 *	  how a handler function is recognised as one, the outputs handlers
 *	  return, and what a running handler may know of the replica running it
 *	  (spool.current_replica() and spool.handler_settings()).  The replica
 *	  sets that context; handlers only read it.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/namespace.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "funcapi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/syscache.h"
#include "utils/typcache.h"

#include "processor/handler.h"

PG_FUNCTION_INFO_V1(spool_current_replica);
PG_FUNCTION_INFO_V1(spool_handler_settings);

/* The native handlers. */
static const SpoolNativeHandler *const natives[] = {
	&spool_window_alert_handler,
};

static Oid	output_type = InvalidOid;
static Oid	output_array_type = InvalidOid;
static int	current_replica_no = 0;
static Jsonb *current_settings = NULL;

static Oid	native_oid(const char *name);
static void lookup_output_type(void);

/*
 * The native handler whose SQL function is fn, or NULL for a handler that
 * is a plain SQL function.
 */
const SpoolNativeHandler *
spool_native_handler(Oid fn)
{
	int			i;

	for (i = 0; i < lengthof(natives); i++)
		if (fn == native_oid(natives[i]->name))
			return natives[i];
	return NULL;
}

/* spool.<name>(jsonb, spool.entries[]), or InvalidOid. */
static Oid
native_oid(const char *name)
{
	Oid			nsp = get_namespace_oid("spool", false);
	Oid			argtypes[2];
	oidvector  *args;
	Oid			entries_type = GetSysCacheOid2(TYPENAMENSP, Anum_pg_type_oid,
											   CStringGetDatum("entries"),
											   ObjectIdGetDatum(nsp));

	argtypes[0] = JSONBOID;
	argtypes[1] = get_array_type(entries_type);
	args = buildoidvector(argtypes, 2);
	return GetSysCacheOid3(PROCNAMEARGSNSP, Anum_pg_proc_oid,
						   CStringGetDatum(name), PointerGetDatum(args),
						   ObjectIdGetDatum(nsp));
}

/* Set by a replica once it knows its number and its handler's settings. */
void
spool_handler_context_set(int replica_no, Jsonb *settings)
{
	current_replica_no = replica_no;
	current_settings = settings;
}

/* The settings of the handler the running replica calls; NULL elsewhere. */
Jsonb *
spool_handler_current_settings(void)
{
	return current_replica_no > 0 ? current_settings : NULL;
}

/* SQL: spool.current_replica() */
Datum
spool_current_replica(PG_FUNCTION_ARGS)
{
	if (current_replica_no <= 0)
		PG_RETURN_NULL();
	PG_RETURN_INT32(current_replica_no);
}

/* SQL: spool.handler_settings() */
Datum
spool_handler_settings(PG_FUNCTION_ARGS)
{
	Jsonb	   *s = spool_handler_current_settings();

	if (s == NULL)
		PG_RETURN_NULL();
	PG_RETURN_JSONB_P(s);
}

static void
lookup_output_type(void)
{
	Oid			nsp = get_namespace_oid("spool", false);

	output_type = GetSysCacheOid2(TYPENAMENSP, Anum_pg_type_oid,
								  CStringGetDatum("output"), ObjectIdGetDatum(nsp));
	if (!OidIsValid(output_type))
		elog(ERROR, "type spool.output does not exist");
	output_array_type = get_array_type(output_type);
}

/* A spool.output[] of n outputs (targets[i] may repeat one pointer). */
Datum
spool_make_outputs(int n, const char *const *targets, char **keys, Jsonb **payloads)
{
	TupleDesc	desc;
	Datum	   *elems = palloc(sizeof(Datum) * Max(n, 1));
	int			i;

	/* Re-resolved per call: cheap, and survives DROP/CREATE EXTENSION. */
	lookup_output_type();
	desc = lookup_rowtype_tupdesc(output_type, -1);
	for (i = 0; i < n; i++)
	{
		Datum		v[3];
		bool		nulls[3] = {false, keys[i] == NULL, payloads[i] == NULL};
		HeapTuple	tup;

		v[0] = CStringGetTextDatum(targets[i]);
		v[1] = keys[i] ? CStringGetTextDatum(keys[i]) : (Datum) 0;
		v[2] = payloads[i] ? JsonbPGetDatum(payloads[i]) : (Datum) 0;
		tup = heap_form_tuple(desc, v, nulls);
		elems[i] = HeapTupleGetDatum(tup);
	}
	ReleaseTupleDesc(desc);
	return PointerGetDatum(construct_array(elems, n, output_type, -1, false, TYPALIGN_DOUBLE));
}
