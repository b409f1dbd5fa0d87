/*-------------------------------------------------------------------------
 *
 * options.h
 *	  Option tables: the jsonb options objects of the SQL functions (source,
 *	  processor and target options, window_alert settings) are described by
 *	  a static table of SpoolOption specs, checked, defaulted and stored into
 *	  the caller's struct by spool_parse_options, and written back with every
 *	  default filled in by spool_options_jsonb.  See options.c.
 *
 *	  Durations (docs/sql-reference.md#durations): an interval string with
 *	  its unit ('250ms', '5 s', '2 min', '1h', any PostgreSQL interval), or a
 *	  bare number (a JSON number, or a string holding only one), which is a
 *	  whole number of milliseconds.
 *
 *-------------------------------------------------------------------------
 */
#ifndef SPOOL_OPTIONS_H
#define SPOOL_OPTIONS_H

#include "postgres.h"

#include "datatype/timestamp.h"
#include "lib/stringinfo.h"
#include "utils/jsonb.h"

typedef enum SpoolOptionType
{
	SPOOL_OPT_INT,				/* integer member: a JSON integer in [lo, hi] */
	SPOOL_OPT_STRING,			/* char *: a non-empty string of at most hi
								 * bytes (0: any length) */
	SPOOL_OPT_CHOICE,			/* integer, enum or bool member: the index of
								 * the value in choices */
	SPOOL_OPT_DURATION,			/* integer member counting units of `unit`
								 * microseconds, in [lo, hi] of those units */
	SPOOL_OPT_LIST,				/* char ** member and an int at count_offset:
								 * a non-empty array of non-empty strings;
								 * JSON null is the default (empty) */
	SPOOL_OPT_OBJECT,			/* Jsonb *: an object, kept as it is */
	SPOOL_OPT_CUSTOM			/* only the parse (and render) callbacks */
} SpoolOptionType;

/* SpoolOption.flags */
#define SPOOL_OPT_REQUIRED	0x01	/* leaving it out is an error */
#define SPOOL_OPT_TEXT		0x02	/* DURATION: written back as text ('10 ms'),
									 * not as a number of milliseconds */
#define SPOOL_OPT_INPUT		0x04	/* never written back (stored elsewhere) */

struct SpoolOption;
struct SpoolOptionTable;

/*
 * parse: replaces the type's parser; it gets the caller's whole struct and
 * may call spool_option_value for the type's own parsing first.  render:
 * replaces the type's rendering; it appends one JSON value, or returns false
 * to leave the key out.
 */
typedef void (*SpoolOptionParse) (const struct SpoolOptionTable *table,
								  const struct SpoolOption *opt,
								  JsonbValue *value, void *result);
typedef bool (*SpoolOptionRender) (const struct SpoolOption *opt,
								   const void *result, StringInfo buf);

typedef struct SpoolOption
{
	const char *name;
	SpoolOptionType type;
	int			flags;
	uint32		scopes;			/* SPOOL_OPT_SCOPE bits that take it; 0: all */
	size_t		offset;			/* the member the value goes to ... */
	size_t		size;			/* ... and its size (1: a bool) */
	size_t		count_offset;	/* LIST, paths: the int member of the length */
	int64		dflt;			/* INT, CHOICE, DURATION: in the member's unit */
	const char *dflt_text;		/* STRING, OBJECT (JSON text): or NULL */
	int64		lo;				/* INT, DURATION: bounds in the member's unit */
	int64		hi;				/* STRING: most bytes */
	int64		unit;			/* DURATION: microseconds per unit of the member */
	const char *const *choices; /* CHOICE: the names, NULL-terminated */
	const char *what;			/* in messages: what a value must be
								 * (STRING), contain (LIST, OBJECT) or look
								 * like (DURATION: an example interval) */
	const char *doc;			/* a sentence about the option: the detail of
								 * its errors */
	SpoolOptionParse parse;
	SpoolOptionRender render;
} SpoolOption;

#define SPOOL_OPT_SCOPE(n)	(1U << (n))

/* .options, .noptions and .size of a SpoolOptionTable initializer. */
#define SPOOL_OPT_TABLE(specs, type) \
	.options = (specs), .noptions = lengthof(specs), .size = sizeof(type)

/* .offset and .size of member of struct type, in a SpoolOption initializer. */
#define SPOOL_OPT_MEMBER(type, member) \
	.offset = offsetof(type, member), .size = sizeof(((type *) 0)->member)

/*
 * A family of options and the wording of its errors (all SP001):
 *	 "<prefix>unknown <noun> "k"[ for a <scope> <scope_noun>]", listing the
 *	   keys as "<listing> a, b and c." in the hint (in the detail when the
 *	   table has a hint of its own, which every error carries);
 *	 "<prefix><subject>"k" <requirement>", or, when subject is NULL,
 *	   "<prefix>invalid value for <noun> "k"" with "It <requirement>." as
 *	   detail;
 *	 "<prefix><not_object>" when the options are no JSON object.
 */
typedef struct SpoolOptionTable
{
	const SpoolOption *options; /* in the order the listing names them */
	int			noptions;
	size_t		size;			/* of the struct the options are parsed into */
	const char *prefix;
	const char *noun;
	const char *subject;
	const char *listing;
	const char *not_object;
	const char *hint;
	const char *const *scopes;	/* names of the scopes, or NULL */
	const char *scope_noun;
} SpoolOptionTable;

extern void *spool_parse_options(const SpoolOptionTable *table, int scope,
								 Jsonb *options);
extern Jsonb *spool_options_jsonb(const SpoolOptionTable *table, int scope,
								  const void *result);

/* For parse callbacks and cross-field checks */
extern void spool_option_value(const SpoolOptionTable *table, const SpoolOption *opt,
							   JsonbValue *v, void *result);
extern int64 spool_option_integer(const SpoolOptionTable *table, const SpoolOption *opt,
								  JsonbValue *v, int64 lo, int64 hi);
extern int	spool_option_choice(const SpoolOptionTable *table, const SpoolOption *opt,
								const char *key, JsonbValue *v,
								const char *const *choices);
extern int64 spool_option_duration_us(const SpoolOptionTable *table, const SpoolOption *opt,
									  JsonbValue *v);
extern Interval *spool_option_interval(const SpoolOptionTable *table,
									   const SpoolOption *opt, const char *key,
									   JsonbValue *v);
extern JsonbContainer *spool_option_object(const SpoolOptionTable *table,
										   const SpoolOption *opt, JsonbValue *v);
extern void spool_option_bad(const SpoolOptionTable *table, const SpoolOption *opt,
							 const char *key, const char *requirement) pg_attribute_noreturn();
extern void spool_option_error(const SpoolOptionTable *table, const char *msg,
							   const char *hint) pg_attribute_noreturn();

extern bool spool_json_number_syntax(const char *s);
extern char *spool_format_duration(int64 us);

#endif							/* SPOOL_OPTIONS_H */
