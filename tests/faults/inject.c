/* LD_PRELOAD shim that makes libc file calls fail, for the files whose path contains a substring.

Orbax reads and writes array bytes through tensorstore's C++ file kvstore (open, then pread /
write / writev / fsync on the descriptor), so a Python-level mock never reaches that path. This
shim does: it wraps the libc entry points and fails the matching calls with a chosen errno.

Configured by environment variables, read when the library is loaded (and again by
`jaxckpt_fault_configure()`, which a test calls through ctypes to change faults in one process):

  JAXCKPT_FAULT_PATH   substring of the path to fail (required; unset: the shim does nothing)
  JAXCKPT_FAULT_OP     comma-separated: open, read, write, fsync, rename (default: read)
  JAXCKPT_FAULT_ERRNO  EIO, EMFILE, ENFILE, EAGAIN, ENOMEM, EACCES, ENOSPC, ... or a number (default: EIO)
  JAXCKPT_FAULT_AFTER  let this many matching calls succeed first (default 0)
  JAXCKPT_FAULT_TIMES  then fail this many (default -1: every one after)
  JAXCKPT_FAULT_LOG    file to which each injected failure appends "op errno path"

read, write and fsync match on the path a descriptor was opened with: every open of a matching
path records its descriptor (close forgets it). Calls counted by AFTER/TIMES are the matching
calls of the chosen ops, in this process. Not covered: I/O through mmap'd pages, and files opened
through stdio (glibc's fopen does not call the interposable open).

Build: gcc -shared -fPIC -O2 -U_FORTIFY_SOURCE -o inject.so inject.c -ldl
*/
#undef _FORTIFY_SOURCE
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

enum { OP_OPEN = 1, OP_READ = 2, OP_WRITE = 4, OP_FSYNC = 8, OP_RENAME = 16 };
#define MAX_TRACKED_FD 65536

static const char *fault_path;
static int fault_ops = OP_READ;
static int fault_errno = EIO;
static long fault_after;
static long fault_times = -1;
static long matched_calls;
static int log_fd = -1;
static unsigned char tracked[MAX_TRACKED_FD];

#define REAL(name) real_##name
#define DECLARE_REAL(ret, name, ...)                                      \
  static ret (*real_##name)(__VA_ARGS__);                                 \
  static void load_##name(void) {                                         \
    if (!real_##name) real_##name = (ret (*)(__VA_ARGS__))dlsym(RTLD_NEXT, #name); \
  }

DECLARE_REAL(int, open, const char *, int, ...)
DECLARE_REAL(int, open64, const char *, int, ...)
DECLARE_REAL(int, openat, int, const char *, int, ...)
DECLARE_REAL(int, openat64, int, const char *, int, ...)
DECLARE_REAL(int, __open_2, const char *, int)
DECLARE_REAL(int, __open64_2, const char *, int)
DECLARE_REAL(int, __openat_2, int, const char *, int)
DECLARE_REAL(int, __openat64_2, int, const char *, int)
DECLARE_REAL(int, close, int)
DECLARE_REAL(ssize_t, read, int, void *, size_t)
DECLARE_REAL(ssize_t, readv, int, const struct iovec *, int)
DECLARE_REAL(ssize_t, pread, int, void *, size_t, off_t)
DECLARE_REAL(ssize_t, pread64, int, void *, size_t, off64_t)
DECLARE_REAL(ssize_t, preadv, int, const struct iovec *, int, off_t)
DECLARE_REAL(ssize_t, write, int, const void *, size_t)
DECLARE_REAL(ssize_t, writev, int, const struct iovec *, int)
DECLARE_REAL(ssize_t, pwrite, int, const void *, size_t, off_t)
DECLARE_REAL(ssize_t, pwrite64, int, const void *, size_t, off64_t)
DECLARE_REAL(ssize_t, pwritev, int, const struct iovec *, int, off_t)
DECLARE_REAL(int, fsync, int)
DECLARE_REAL(int, fdatasync, int)
DECLARE_REAL(int, rename, const char *, const char *)
DECLARE_REAL(int, renameat, int, const char *, int, const char *)

static int errno_named(const char *name) {
  static const struct { const char *name; int value; } known[] = {
      {"EIO", EIO},       {"EMFILE", EMFILE}, {"ENFILE", ENFILE},       {"EAGAIN", EAGAIN},
      {"ENOMEM", ENOMEM}, {"EACCES", EACCES}, {"ENOSPC", ENOSPC},       {"EROFS", EROFS},
      {"EDQUOT", EDQUOT}, {"EINTR", EINTR},   {"EPERM", EPERM},         {"ENOENT", ENOENT},
      {"EBADF", EBADF},   {"ESTALE", ESTALE}, {"ETIMEDOUT", ETIMEDOUT}, {"EBUSY", EBUSY},
  };
  for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
    if (strcmp(name, known[i].name) == 0) return known[i].value;
  int value = atoi(name);
  return value > 0 ? value : EIO;
}

static int ops_named(const char *names) {
  int ops = 0;
  if (strstr(names, "open")) ops |= OP_OPEN;
  if (strstr(names, "read")) ops |= OP_READ;
  if (strstr(names, "write")) ops |= OP_WRITE;
  if (strstr(names, "fsync")) ops |= OP_FSYNC;
  if (strstr(names, "rename")) ops |= OP_RENAME;
  return ops;
}

__attribute__((constructor)) static void configure(void) {
  const char *value;
  /* A copy: the environment's own string may be freed when a test changes it. */
  fault_path = (value = getenv("JAXCKPT_FAULT_PATH")) && *value ? strdup(value) : NULL;
  if ((value = getenv("JAXCKPT_FAULT_OP"))) fault_ops = ops_named(value);
  if ((value = getenv("JAXCKPT_FAULT_ERRNO"))) fault_errno = errno_named(value);
  if ((value = getenv("JAXCKPT_FAULT_AFTER"))) fault_after = atol(value);
  if ((value = getenv("JAXCKPT_FAULT_TIMES"))) fault_times = atol(value);
  if (fault_path && (value = getenv("JAXCKPT_FAULT_LOG"))) {
    load_open();
    log_fd = REAL(open)(value, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  }
}

/* Re-reads the configuration from the environment, for a test that injects several faults in one
   process: set os.environ, then call `ctypes.CDLL(None).jaxckpt_fault_configure()`. Counts restart,
   and descriptors opened before no longer match. */
void jaxckpt_fault_configure(void) {
  if (log_fd >= 0) {
    load_close();
    REAL(close)(log_fd);
    log_fd = -1;
  }
  fault_ops = OP_READ;
  fault_errno = EIO;
  fault_after = 0;
  fault_times = -1;
  __atomic_store_n(&matched_calls, 0, __ATOMIC_RELAXED);
  memset(tracked, 0, sizeof tracked);
  configure();
}

static int path_matches(int dirfd, const char *path) {
  if (!fault_path || !path) return 0;
  if (strstr(path, fault_path)) return 1;
  if (path[0] == '/' || dirfd == AT_FDCWD) return 0;
  /* Relative to a directory descriptor: match on that directory's path joined with `path`. */
  char link[64], full[PATH_MAX];
  snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
  ssize_t n = readlink(link, full, sizeof full - 1);
  if (n < 0) return 0;
  snprintf(full + n, sizeof full - (size_t)n, "/%s", path);
  return strstr(full, fault_path) != NULL;
}

static int fd_matches(int fd) { return fd >= 0 && fd < MAX_TRACKED_FD && tracked[fd]; }

static void track(int fd, int matches) {
  if (fd >= 0 && fd < MAX_TRACKED_FD) __atomic_store_n(&tracked[fd], (unsigned char)matches, __ATOMIC_RELAXED);
}

static void log_failure(const char *op, const char *path, int fd) {
  if (log_fd < 0) return;
  char line[PATH_MAX + 64];
  int n = path ? snprintf(line, sizeof line, "%s %d %s\n", op, fault_errno, path)
               : snprintf(line, sizeof line, "%s %d fd:%d\n", op, fault_errno, fd);
  load_write();
  if (n > 0) REAL(write)(log_fd, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
}

/* Whether this matching call fails: the calls after the first AFTER, TIMES of them. */
static int should_fail(int op, const char *name, const char *path, int fd) {
  if (!(fault_ops & op)) return 0;
  long index = __atomic_fetch_add(&matched_calls, 1, __ATOMIC_RELAXED);
  if (index < fault_after || (fault_times >= 0 && index >= fault_after + fault_times)) return 0;
  log_failure(name, path, fd);
  errno = fault_errno;
  return 1;
}

static mode_t mode_arg(int flags, va_list args) {
  return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE ? (mode_t)va_arg(args, int) : 0;
}

/* The open family: fail if asked, and remember whether the descriptor belongs to a matching path. */
#define OPEN_BODY(name, dirfd, path, call)                                 \
  int matches = path_matches(dirfd, path);                                 \
  if (matches && should_fail(OP_OPEN, name, path, -1)) return -1;          \
  int fd = call;                                                           \
  int saved = errno;                                                       \
  track(fd, matches);                                                      \
  errno = saved;                                                           \
  return fd;

int open(const char *path, int flags, ...) {
  va_list args; va_start(args, flags); mode_t mode = mode_arg(flags, args); va_end(args);
  load_open();
  OPEN_BODY("open", AT_FDCWD, path, REAL(open)(path, flags, mode))
}

int open64(const char *path, int flags, ...) {
  va_list args; va_start(args, flags); mode_t mode = mode_arg(flags, args); va_end(args);
  load_open64();
  OPEN_BODY("open", AT_FDCWD, path, REAL(open64)(path, flags, mode))
}

int openat(int dirfd, const char *path, int flags, ...) {
  va_list args; va_start(args, flags); mode_t mode = mode_arg(flags, args); va_end(args);
  load_openat();
  OPEN_BODY("open", dirfd, path, REAL(openat)(dirfd, path, flags, mode))
}

int openat64(int dirfd, const char *path, int flags, ...) {
  va_list args; va_start(args, flags); mode_t mode = mode_arg(flags, args); va_end(args);
  load_openat64();
  OPEN_BODY("open", dirfd, path, REAL(openat64)(dirfd, path, flags, mode))
}

/* The _FORTIFY_SOURCE entry points (tensorstore calls __openat_2). */
int __open_2(const char *path, int flags) {
  load___open_2();
  OPEN_BODY("open", AT_FDCWD, path, REAL(__open_2)(path, flags))
}

int __open64_2(const char *path, int flags) {
  load___open64_2();
  OPEN_BODY("open", AT_FDCWD, path, REAL(__open64_2)(path, flags))
}

int __openat_2(int dirfd, const char *path, int flags) {
  load___openat_2();
  OPEN_BODY("open", dirfd, path, REAL(__openat_2)(dirfd, path, flags))
}

int __openat64_2(int dirfd, const char *path, int flags) {
  load___openat64_2();
  OPEN_BODY("open", dirfd, path, REAL(__openat64_2)(dirfd, path, flags))
}

int close(int fd) {
  load_close();
  track(fd, 0);
  return REAL(close)(fd);
}

#define FD_CALL(op, name, fd, call)                                        \
  load_##name();                                                           \
  if (fd_matches(fd) && should_fail(op, #name, NULL, fd)) return -1;       \
  return call;

ssize_t read(int fd, void *buf, size_t count) { FD_CALL(OP_READ, read, fd, REAL(read)(fd, buf, count)) }
ssize_t readv(int fd, const struct iovec *iov, int n) { FD_CALL(OP_READ, readv, fd, REAL(readv)(fd, iov, n)) }
ssize_t pread(int fd, void *buf, size_t count, off_t offset) {
  FD_CALL(OP_READ, pread, fd, REAL(pread)(fd, buf, count, offset))
}
ssize_t pread64(int fd, void *buf, size_t count, off64_t offset) {
  FD_CALL(OP_READ, pread64, fd, REAL(pread64)(fd, buf, count, offset))
}
ssize_t preadv(int fd, const struct iovec *iov, int n, off_t offset) {
  FD_CALL(OP_READ, preadv, fd, REAL(preadv)(fd, iov, n, offset))
}
ssize_t write(int fd, const void *buf, size_t count) { FD_CALL(OP_WRITE, write, fd, REAL(write)(fd, buf, count)) }
ssize_t writev(int fd, const struct iovec *iov, int n) { FD_CALL(OP_WRITE, writev, fd, REAL(writev)(fd, iov, n)) }
ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
  FD_CALL(OP_WRITE, pwrite, fd, REAL(pwrite)(fd, buf, count, offset))
}
ssize_t pwrite64(int fd, const void *buf, size_t count, off64_t offset) {
  FD_CALL(OP_WRITE, pwrite64, fd, REAL(pwrite64)(fd, buf, count, offset))
}
ssize_t pwritev(int fd, const struct iovec *iov, int n, off_t offset) {
  FD_CALL(OP_WRITE, pwritev, fd, REAL(pwritev)(fd, iov, n, offset))
}
int fsync(int fd) { FD_CALL(OP_FSYNC, fsync, fd, REAL(fsync)(fd)) }
int fdatasync(int fd) { FD_CALL(OP_FSYNC, fdatasync, fd, REAL(fdatasync)(fd)) }

int rename(const char *from, const char *to) {
  load_rename();
  if ((path_matches(AT_FDCWD, from) || path_matches(AT_FDCWD, to)) && should_fail(OP_RENAME, "rename", from, -1))
    return -1;
  return REAL(rename)(from, to);
}

int renameat(int fromfd, const char *from, int tofd, const char *to) {
  load_renameat();
  if ((path_matches(fromfd, from) || path_matches(tofd, to)) && should_fail(OP_RENAME, "rename", from, -1))
    return -1;
  return REAL(renameat)(fromfd, from, tofd, to);
}
