/*
 * json_check.h: JSON validation for the ingest worker (json_check.c).  Kept
 * apart from ingest.h because jansson's json_object() clashes with fmgr.h.
 */
#ifndef SPOOL_JSON_CHECK_H
#define SPOOL_JSON_CHECK_H

extern bool spool_json_valid(const char *data, size_t len, char *errbuf, size_t errlen);

#endif							/* SPOOL_JSON_CHECK_H */
