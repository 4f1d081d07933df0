/* Shifts a process's wall clock by WALLCLOCK_SHIFT_SECONDS (LD_PRELOAD), as on a host
 * whose clock has drifted: CLOCK_REALTIME and what is read from it (time,
 * gettimeofday) move; the monotonic clocks, which timers and timeouts use, do not.
 *
 * libfaketime does the same and more, but its wrappers of sleeps and timed waits break
 * CPython's (a monotonic sleep fails with EINVAL, a timed lock wait never returns):
 * this shifts the reading and touches nothing else. Built by the tests with the
 * machine's C compiler. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

static long long shift_ns(void) {
    static int ready;
    static long long ns;
    if (!ready) {
        const char *value = getenv("WALLCLOCK_SHIFT_SECONDS");
        ns = value ? (long long)(atof(value) * 1e9) : 0;
        ready = 1;
    }
    return ns;
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    static int (*real)(clockid_t, struct timespec *);
    if (!real) real = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
    int rc = real(id, ts);
    if (rc == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) {
        long long t = (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec + shift_ns();
        ts->tv_sec = (time_t)(t / 1000000000LL);
        ts->tv_nsec = (long)(t % 1000000000LL);
    }
    return rc;
}

int gettimeofday(struct timeval *restrict tv, void *restrict tz) {
    struct timespec ts;
    int rc = clock_gettime(CLOCK_REALTIME, &ts);
    (void)tz;
    if (rc == 0) {
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return rc;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}
