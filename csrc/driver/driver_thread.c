/* driver_thread.c — the life of a per-queue driver thread, shared by the load generator
 * (load.c) and the trace replayer (replay.c): start and the tid hand-off, naming, pinning,
 * stop, waiting with a timeout, join. Nothing here runs per request.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "driver.h"

void driver_cond_init(pthread_cond_t *cond)
{
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(cond, &attr);
    pthread_condattr_destroy(&attr);
}

int driver_thread_init(struct driver_thread *t)
{
    pthread_mutex_init(&t->lock, NULL);
    driver_cond_init(&t->cond);
    t->joined = 1;   /* nothing to join until the thread exists */
    t->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    return t->wake_fd < 0 ? -errno : 0;
}

int driver_thread_start(struct driver_thread *t, void *(*fn)(void *), void *arg)
{
    int rc = -pthread_create(&t->thread, NULL, fn, arg);
    if (rc < 0)
        return rc;
    t->joined = 0;
    pthread_mutex_lock(&t->lock);
    while (!t->tid)
        pthread_cond_wait(&t->cond, &t->lock);
    rc = t->init_rc;
    pthread_mutex_unlock(&t->lock);
    return rc;
}

void driver_thread_enter(const char *prefix, unsigned queue, int cpu)
{
    char name[16];
    snprintf(name, sizeof(name), "%s%u", prefix, queue);
    pthread_setname_np(pthread_self(), name);
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);   /* schedules (open loop, timed replay) want µs wake-ups */
    if (cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
    }
}

void driver_thread_ready(struct driver_thread *t, int init_rc)
{
    pthread_mutex_lock(&t->lock);
    t->init_rc = init_rc;
    t->tid = (int)syscall(SYS_gettid);
    pthread_cond_broadcast(&t->cond);
    pthread_mutex_unlock(&t->lock);
}

void driver_thread_finish(struct driver_thread *t)
{
    pthread_mutex_lock(&t->lock);
    __atomic_store_n(&t->done, 1, __ATOMIC_RELEASE);   /* also read without the lock */
    pthread_cond_broadcast(&t->cond);
    pthread_mutex_unlock(&t->lock);
}

void driver_thread_stop(struct driver_thread *t)
{
    pthread_mutex_lock(&t->lock);
    __atomic_store_n(&t->stop, 1, __ATOMIC_RELAXED);
    pthread_cond_broadcast(&t->cond);   /* a thread waiting on the cond for its owner's reasons */
    pthread_mutex_unlock(&t->lock);
    if (t->wake_fd >= 0)
        driver_wake(t->wake_fd);
}

void driver_deadline(struct timespec *deadline, int timeout_ms)
{
    clock_gettime(CLOCK_MONOTONIC, deadline);
    if (timeout_ms > 0) {
        deadline->tv_sec += timeout_ms / 1000;
        deadline->tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (deadline->tv_nsec >= 1000000000L) {
            deadline->tv_sec++;
            deadline->tv_nsec -= 1000000000L;
        }
    }
}

int driver_thread_wait(struct driver_thread *t, int timeout_ms)
{
    struct timespec deadline;
    driver_deadline(&deadline, timeout_ms);
    pthread_mutex_lock(&t->lock);
    while (!t->done) {
        if (timeout_ms < 0)
            pthread_cond_wait(&t->cond, &t->lock);
        else if (timeout_ms == 0 ||
                 pthread_cond_timedwait(&t->cond, &t->lock, &deadline) == ETIMEDOUT)
            break;
    }
    int done = t->done;
    pthread_mutex_unlock(&t->lock);
    return done;
}

int driver_thread_done(const struct driver_thread *t)
{
    struct driver_thread *m = (struct driver_thread *)t;   /* the lock, not the state */
    pthread_mutex_lock(&m->lock);
    int done = m->done;
    pthread_mutex_unlock(&m->lock);
    return done;
}

void driver_thread_destroy(struct driver_thread *t)
{
    if (!t->joined) {
        driver_thread_stop(t);
        pthread_join(t->thread, NULL);
        t->joined = 1;
    }
    if (t->wake_fd >= 0)
        close(t->wake_fd);
    t->wake_fd = -1;
    pthread_cond_destroy(&t->cond);
    pthread_mutex_destroy(&t->lock);
}

void driver_take_rusage(uint64_t *usr, uint64_t *sys, uint64_t *ctx)
{
    struct rusage ru;
    if (getrusage(RUSAGE_THREAD, &ru) != 0)
        return;
    *usr = (uint64_t)ru.ru_utime.tv_sec * 1000000000ull + (uint64_t)ru.ru_utime.tv_usec * 1000;
    *sys = (uint64_t)ru.ru_stime.tv_sec * 1000000000ull + (uint64_t)ru.ru_stime.tv_usec * 1000;
    *ctx = (uint64_t)ru.ru_nvcsw + (uint64_t)ru.ru_nivcsw;
}
