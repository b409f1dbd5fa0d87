# spool_ext — PGXS build (PostgreSQL 15)

MODULE_big = spool_ext
OBJS = $(patsubst %.c,%.o,$(sort $(wildcard src/*.c src/*/*.c)))

EXTENSION = spool_ext
DATA = $(sort $(wildcard spool_ext--*.sql))
PGFILEDESC = "spool_ext - leases, fencing, nonces and Kafka-fed pipelines"

# The library runs only against a catalog of its own version: the control
# file's default_version (src/launcher/launcher.c).
EXTVERSION = $(shell sed -n "s/^default_version = '\(.*\)'$$/\1/p" $(srcdir)/spool_ext.control)
PG_CPPFLAGS = -I$(srcdir)/src -DSPOOL_EXT_VERSION='"$(EXTVERSION)"'
SHLIB_LINK = -lrdkafka -ljansson

# Every test layer runs against a throwaway instance with the library preloaded.
SPOOL_TEMP_CONF = $(srcdir)/test/spool_test.conf
REGRESS = setup lease nonce nonce_ops errors security sources source_ops processors processor_ops window_alert outbox retention metrics prometheus databases runbook drop_extension
REGRESS_OPTS = --temp-instance=$(CURDIR)/tmp_regress --temp-config=$(SPOOL_TEMP_CONF)
ISOLATION = lease_race fence_steal nonce_concurrent nonce_holes nonce_queue_reports nonce_set_next
ISOLATION_OPTS = --temp-instance=$(CURDIR)/tmp_isolation --temp-config=$(SPOOL_TEMP_CONF) \
	--temp-config=$(srcdir)/test/spool_isolation.conf --load-extension=spool_ext
TAP_TESTS = 1
PROVE_TESTS = $(sort $(wildcard test/t/*.pl))

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# Every object depends on the shared headers (PGXS tracks no header dependencies).
$(OBJS): $(wildcard src/*/*.h)
src/launcher/launcher.o: spool_ext.control

# Set after PGXS, which resets it: lets TAP tests find test/SpoolTest.pm.
PROVE_FLAGS = -I $(srcdir)/test

.PHONY: check-all
check-all: installcheck
