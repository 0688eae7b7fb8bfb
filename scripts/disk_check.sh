# Sourced by the install scripts: stop with one clear line when the disk that will hold a venv
# has too little room, instead of pip's "[Errno 28] No space left on device" mid-install.
# need_disk GIB DIR WHAT
need_disk() {
  local need=$1 dir=$2 what=$3 free
  free=$(df -Pk "$dir" | awk 'NR == 2 {print int($4 / 1048576)}')
  if [ "$free" -lt "$need" ]; then
    echo "error: $what needs about $need GiB free on the disk of $dir; it has $free GiB." \
         "Free some space (pip's cache: python3 -m pip cache purge) and run again." >&2
    exit 1
  fi
}
