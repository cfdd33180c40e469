# Time arithmetic shared by `make demo`'s awk scripts (task_times.awk, dag_progress.awk), loaded before them
# (`awk -f tools/iso_seconds.awk -f tools/<script>.awk`).
function secs(t, p) {  # seconds of the day of an ISO timestamp (2026-12-06T06:56:22.834648+00:00), -1 for anything else
    if (t !~ /^[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T/) return -1
    split(t, p, /[T:]/)  # p[2] hours, p[3] minutes, p[4] seconds with the zone after them (numeric prefix)
    return p[2] * 3600 + p[3] * 60 + p[4]
}
function elapsed(s, e, d) {  # seconds from s to e (secs values), across midnight; -1 when either is unknown
    if (s < 0 || e < 0) return -1
    d = e - s
    return (d < 0) ? d + 86400 : d
}
