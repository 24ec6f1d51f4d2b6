#!/bin/sh
# render.sh REFERENCE OVERRIDES: print REFERENCE (a pgbouncer.ini) with each `key = value`
# of OVERRIDES put in place of the same key in the same section ([pgbouncer] and
# [databases] only), keeping comments and all other lines; fail if an override names a
# key the reference does not set.  Mirrors proxy/devstack.py render_pgbouncer_ini, and
# tests/unit/test_deploy_files.py checks that the two agree.  POSIX sh and awk (busybox).
set -eu
[ $# -eq 2 ] || { echo "usage: render.sh REFERENCE OVERRIDES" >&2; exit 2; }
awk '
  FNR == 1 { nfile++; section = "" }
  {
    stripped = $0
    sub(/^[ \t]+/, "", stripped)
    sub(/[ \t\r]+$/, "", stripped)
    key = ""
    if (substr(stripped, 1, 1) == "[") {
      section = stripped
      gsub(/\[|\]/, "", section)
    } else if (match(stripped, /^[a-z_]+[ \t]*=/)) {
      key = substr(stripped, 1, index(stripped, "=") - 1)
      sub(/[ \t]+$/, "", key)
      value = substr(stripped, index(stripped, "=") + 1)
      sub(/^[ \t]+/, "", value)
    }
  }
  nfile == 1 {
    if (key != "") { override[section, key] = value }
    next
  }
  key != "" && (section == "pgbouncer" || section == "databases") && ((section, key) in override) {
    print key " = " override[section, key]
    used[section, key] = 1
    next
  }
  { print }
  END {
    bad = 0
    for (k in override) {
      if (!(k in used)) {
        split(k, part, SUBSEP)
        printf "render.sh: [%s] %s is not set in the reference config\n", part[1], part[2] > "/dev/stderr"
        bad = 1
      }
    }
    exit bad
  }
' "$2" "$1"
