/* record.h — the record room's own header: the recorder (recorder.c), its buffered outputs,
 * and the formats it writes (blktrace.c, iolog.c). Nothing outside csrc/record/ includes it;
 * the engine sees only record/ring.h. */
#ifndef DP_RECORD_H_INTERNAL
#define DP_RECORD_H_INTERNAL

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "record/dp_record.h"
#include "record/ring.h"

/* One output file, written through a buffer by the writer thread only. Regular files take
 * every write; a pipe or a socket is written non-blocking, and when it is full the writer
 * stops taking entries from the rings (which then fill, and drop) instead of waiting in write. */
struct rec_out {
    int fd;
    char *buf;
    size_t len;
    size_t cap;
    uint64_t bytes;              /* written to fd (relaxed: read by stats) */
    int blocked;                 /* the last write found the fd full */
};

/* Room for n more bytes at the end of out's buffer (writing some out first if needed), or
 * NULL when the fd cannot take anything now (or has failed: the recorder's error is set and
 * what is given from then on is discarded). */
char *out_reserve(struct dp_recorder *rec, struct rec_out *out, size_t n);
void out_commit(struct rec_out *out, size_t n);
/* Write what is buffered (as much as the fd takes now); returns 0, -EAGAIN or the error. */
int out_flush(struct dp_recorder *rec, struct rec_out *out);

/* Open one output per path (a format's open calls it); the recorder closes them. */
int rec_open_outputs(struct dp_recorder *rec, unsigned nouts, const char *const *paths);

/* A format: what the writer does with each queue's entries. */
struct rec_format {
    /* Open the file(s), write the headers. */
    int (*open)(struct dp_recorder *rec, const char *path);
    /* One entry of queue q. 0, or -EAGAIN when the output cannot take it now (the entry is
     * offered again later). */
    int (*entry)(struct dp_recorder *rec, unsigned q, const struct dp_rec_entry *e);
    /* After each round of entries: write what may be written by now (final: everything, the
     * rings are empty for good). Returns how much it wrote (lines, events); sets *blocked when
     * the output could not take all that was ready. */
    uint64_t (*pump)(struct dp_recorder *rec, uint64_t now, int final, int *blocked);
    /* The trailer, once everything is written. */
    void (*finish)(struct dp_recorder *rec);
    void (*free)(struct dp_recorder *rec);
};

extern const struct rec_format rec_blktrace;
extern const struct rec_format rec_iolog;

struct dp_recorder {
    struct dp_recorder_params p;
    const struct rec_format *fmt;
    struct rec_ring *rings;      /* p.queues of them */
    struct rec_out *outs;
    unsigned nouts;
    uint64_t start_ns;           /* CLOCK_MONOTONIC when recording began: time 0 of the file */
    struct timespec start_real;  /* the same moment on the wall clock */
    void *state;                 /* the format's */
    int error;                   /* first output error (-errno; relaxed: read by stats) */
    int stop;
    int has_thread;
    pthread_t thread;
};

/* Decimal digits of v at p; returns the end. */
char *rec_u64(char *p, uint64_t v);

#endif
