/*
 * close_range(2) with `last` clamped to INT_MAX, preloaded into every process of the
 * desktop template (/etc/ld.so.preload).
 *
 * GLib 2.74 (Debian bookworm) closes a child's descriptors with
 * close_range(3, ~0U, 0) and treats any error but ENOSYS as fatal. gVisor answers
 * EINVAL when `last` exceeds INT_MAX (Linux clamps it), so under the gvisor runtime
 * every GLib spawn fails ("Failed to close file descriptor for child process (Invalid
 * argument)"): xfce4-session starts none of xfwm4, xfdesktop or the panel, and
 * gtk-launch and xdg-open start nothing. Descriptors never exceed INT_MAX, so the
 * clamp changes nothing on Linux.
 */
#define _GNU_SOURCE
#include <limits.h>
#include <sys/syscall.h>
#include <unistd.h>

int close_range(unsigned int first, unsigned int last, int flags)
{
    if (first <= last && last > INT_MAX) {
        if (first > INT_MAX)
            return 0; /* nothing can be open there */
        last = INT_MAX;
    }
    return (int)syscall(SYS_close_range, first, last, flags);
}
