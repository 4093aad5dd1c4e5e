# Sourced by scripts/gpu_check.sh and scripts/gpu_session.sh on the device machine (run from the repository
# root): the carried wheels (.whl/, made by `scripts/gpu_check.sh --prepare`) installed into /tmp/site and put
# on PYTHONPATH after src/, and DATA=(--data-dir .fmnist) when the Fashion-MNIST files were carried.
SITE=""
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && SITE=/tmp/site
fi
export PYTHONPATH="$PWD/src${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DATA=()
[ -d .fmnist ] && DATA=(--data-dir "$PWD/.fmnist")
