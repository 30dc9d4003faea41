#!/bin/sh
# Entrypoint of the exemplar image: give this container a private, writable copy of
# the model bundle, then run the exemplar command line as PID 1 (exec), so SIGTERM
# reaches the daemon, which finishes its batch, commits and exits. Arguments are
# exemplar's: `run` (the default), `explain TEXT`, `eval --data FILE`, `config`, ...
#
#   BUNDLE_SOURCE       read-only bundle (baked into the image or mounted);
#                       empty: use EXEMPLAR_MODEL_DIR as it is
#   EXEMPLAR_MODEL_DIR  where the daemon loads the bundle from (the private copy)
#
# Why copy: the embedded exemplar store locks its directory for one process and
# cannot open a read-only one, and what a replica writes to its store must not alter
# the shipped bundle. `exemplar index` on a copy is lost with the container: index
# the bundle itself, then recreate the containers.
set -eu

# The commands that open the bundle's store; the others (config, data, train,
# broker) need no copy.
case "${1:-}" in
    run | explain | eval | index) needs_bundle=yes ;;
    *) needs_bundle=no ;;
esac

if [ -n "${BUNDLE_SOURCE:-}" ] && [ "${needs_bundle}" = yes ]; then
    # A bundle (bundle.json) or a model registry root (SERVING names the version).
    marker=bundle.json
    if [ -f "${BUNDLE_SOURCE}/SERVING" ]; then
        marker=SERVING
    fi
    if [ ! -f "${BUNDLE_SOURCE}/${marker}" ]; then
        echo "exemplar-entrypoint: no model bundle at ${BUNDLE_SOURCE} (bundle.json missing);" \
             "mount a bundle directory there (read-only is fine) or build the 'baked' image" >&2
        exit 2
    fi
    unreadable=$(find "${BUNDLE_SOURCE}" ! -readable -print -quit)
    if [ -n "${unreadable}" ]; then
        echo "exemplar-entrypoint: ${unreadable} is not readable by uid $(id -u);" \
             "make the bundle readable (chmod -R a+rX BUNDLE) or run as its owner" >&2
        exit 2
    fi
    target="${EXEMPLAR_MODEL_DIR:?EXEMPLAR_MODEL_DIR must name the private bundle copy}"
    # Never replace a model registry (the split roles' shared one, with every
    # fine-tuned version and the curator's state) by a plain bundle.
    if [ "${marker}" = bundle.json ] && [ -d "${target}/versions" ]; then
        echo "exemplar-entrypoint: ${target} is a model registry (shared by the split roles);" \
             "set BUNDLE_SOURCE to empty to use it in place rather than copy a bundle over it" >&2
        exit 2
    fi
    # A restarted container keeps its filesystem (and Kubernetes its emptyDir): keep
    # the copy, with what was written to its store, while it is the same model
    # version; a different bundle (an upgrade) replaces it.
    if ! cmp -s "${BUNDLE_SOURCE}/${marker}" "${target}/${marker}"; then
        rm -rf "${target}.partial" "${target}"
        mkdir -p "$(dirname "${target}")"
        cp -R "${BUNDLE_SOURCE}" "${target}.partial"
        chmod -R u+rwX "${target}.partial"
        mv "${target}.partial" "${target}"
    fi
fi

exec exemplar "$@"
