#!/usr/bin/env bash
# Install a fedmq slave on this device as the systemd service fedmq-slave@ID.
#
#   sudo deploy/install-slave.sh --id ID --job JOB --broker HOST[:PORT] \
#        --master-key master.pub --data DATA [options]           install
#   sudo deploy/install-slave.sh --id ID [--broker ...] [--data ...]
#        change settings and upgrade: what is not given is kept from
#        /etc/fedmq/ID.toml; fedmq is reinstalled and the service restarted
#   sudo deploy/install-slave.sh --id ID --uninstall [--purge]   remove
#
#   --id ID               slave id: its name in the job and its key's (A-Z a-z 0-9 _ . -)
#   --job JOB             job id to serve; the broker user is ID@JOB
#   --broker HOST[:PORT]  the Mosquitto broker (port 8883 with TLS, else 1883)
#   --master-key FILE     the master's public key (master.pub), pinned by the slave
#   --master-name NAME    the name the master signs as (its [master] name; default master)
#   --data DATA           the local training data: a .npz or .csv file, module:function,
#                         or reference:I/N (shard I of N of the bundled digits demo data)
#   --ca FILE             CA certificate of the broker (certs/ca.crt of fedmq broker config);
#                         turns TLS on. --tls: TLS with the system's CAs. --no-tls: off.
#   --password-file FILE  broker password of account ID@JOB (passwords/ID@JOB of fedmq broker
#                         config); without it one is generated
#   --source SPEC         what pip installs as fedmq (default: this source tree)
#   --torch SPEC          the PyTorch requirement (default: torch==2.13.0, as tested)
#   --torch-index URL     pip index for torch (default: PyTorch's CPU-only wheels)
#   --no-start            install and enable, but do not (re)start the service
#   --dry-run             print every action, change nothing (needs no root)
#   --uninstall           stop and disable fedmq-slave@ID and remove its configuration,
#                         /opt/fedmq and the unit too when no other fedmq config is left;
#                         keeps its key, broker password and state unless --purge
#   --purge               with --uninstall: delete those as well
#   --root DIR            install below DIR instead of / (image builds, tests): the
#                         unit is enabled offline (systemctl --root), not started
#   --no-systemd          no unit, no systemctl (containers, devices without systemd)
#   --skip-pip            use the Python environment already in /opt/fedmq as it is
#
# Supported: Linux on x86_64 or aarch64 (64-bit ARM: Raspberry Pi 3/4/5 with a 64-bit
# OS), Python 3.11+, systemd 247+. PyTorch publishes no wheels for 32-bit ARM (armv6l,
# armv7l, or a 32-bit OS on a 64-bit CPU): refused.
#
# Result: a venv in /opt/fedmq; the slave's key /etc/fedmq/keys/ID.key and broker
# password ID.broker-password (root-only; systemd hands copies to the service);
# /etc/fedmq/ID.toml, the pinned /etc/fedmq/ID.master.pub and /etc/fedmq/ID.ca.crt
# (public, mode 0644); group fedmq (may read the training data); the service
# enabled and (re)started. docs/OPERATIONS.md, "Installing slaves", says more.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MARKER="written by install-slave.sh"

usage() {  # EXIT_STATUS: 0 for --help (on stdout), 2 for a usage error (on stderr)
    if [ "$1" = 0 ]; then
        sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'
    else
        sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    fi
    exit "$1"
}
say() { echo "install-slave: $*"; }
die() {
    echo "install-slave: error: $*" >&2
    exit 1
}
step() { printf '\n== %s\n' "$*"; }

id='' job='' broker='' master_key='' master_name='' data='' ca='' tls='' password_file=''
start=yes dry_run=no uninstall=no purge=no root='' systemd=yes pip=yes
source_spec=$(dirname "$here")
torch_spec=torch==2.13.0
torch_index=https://download.pytorch.org/whl/cpu
while [ $# -gt 0 ]; do
    case $1 in
        --id|--job|--broker|--master-key|--master-name|--data|--ca|--password-file|--source|--torch|--torch-index|--root)
            [ $# -ge 2 ] || die "$1 needs a value"
            case $1 in
                --id) id=$2 ;;
                --job) job=$2 ;;
                --broker) broker=$2 ;;
                --master-key) master_key=$2 ;;
                --master-name) master_name=$2 ;;
                --data) data=$2 ;;
                --ca) ca=$2; tls=yes ;;
                --password-file) password_file=$2 ;;
                --source) source_spec=$2 ;;
                --torch) torch_spec=$2 ;;
                --torch-index) torch_index=$2 ;;
                --root) root=$(realpath -m "$2"); [ "$root" != / ] || root='' ;;
            esac
            shift 2 ;;
        --tls) tls=yes; shift ;;
        --no-tls) tls=no; ca=''; shift ;;
        --no-start) start=no; shift ;;
        --dry-run) dry_run=yes; shift ;;
        --uninstall) uninstall=yes; shift ;;
        --purge) purge=yes; shift ;;
        --no-systemd) systemd=no; shift ;;
        --skip-pip) pip=no; shift ;;
        -h|--help) usage 0 ;;
        *) echo "install-slave: unknown option $1" >&2; usage 2 ;;
    esac
done
[ -n "$id" ] || usage 2

PREFIX=$root/opt/fedmq
ETC=$root/etc/fedmq
UNIT_DIR=$root/etc/systemd/system
STATE=$root/var/lib/fedmq
unit="fedmq-slave@$id.service"
# What the service sees: systemd puts its credentials here (LoadCredential).
credentials=$root/run/credentials/$unit
config=$ETC/$id.toml
pinned=$ETC/$id.master.pub
ca_dest=$ETC/$id.ca.crt
secret=$ETC/keys/$id.broker-password

# ------------------------------------------------------------------ actions
# Every change goes through these, so --dry-run prints exactly what a real run does.

run() {
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    [ $dry_run = yes ] || "$@"
}

write_file() {  # DEST MODE, content on stdin: replaced atomically
    local dest=$1 mode=$2 content tmp
    content=$(cat)
    echo "+ write $dest (mode $mode)"
    if [ $dry_run = yes ]; then
        printf '%s\n' "$content" | sed 's/^/|   /'
        return
    fi
    tmp=$(mktemp "$dest.XXXXXX")
    printf '%s\n' "$content" > "$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$dest"
}

copy_file() {  # SRC DEST MODE; nothing to do when SRC is DEST
    if [ "$(realpath -m "$1")" = "$(realpath -m "$2")" ]; then
        return
    fi
    run install -m "$3" "$1" "$2"
}

generate_password() {
    echo "+ generate a random broker password into $1 (mode 0600)"
    [ $dry_run = yes ] || (umask 077 && head -c 24 /dev/urandom | base64 | tr -d '/+=\n' > "$1")
}

systemd_unit() {  # enable|restart|disable|daemon-reload [UNIT]: live, or offline below --root
    local verb=$1
    shift
    [ $systemd = yes ] || return 0
    if [ -n "$root" ]; then
        case $verb in
            enable|disable) run systemctl --root="$root" "$verb" "$@" ;;
            *) say "not on a live system (--root): skipped systemctl $verb${1:+ $*}" ;;
        esac
        return
    fi
    case $verb in
        disable) run systemctl disable --now "$@" ;;
        *) run systemctl "$verb" "$@" ;;
    esac
}

# ------------------------------------------------------------------ checks

check_id() {  # VALUE WHAT
    [[ $1 =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || die "$2 '$1': use 1-64 letters, digits, '_', '.', '-'"
}

check_platform() {
    local machine=${INSTALL_SLAVE_MACHINE:-$(uname -m)} bits
    case $machine in
        x86_64|amd64|aarch64|arm64) ;;
        armv6*|armv7*|armv8l|armhf|arm)
            die "this is 32-bit ARM ($machine): PyTorch publishes no wheels for it, so fedmq cannot" \
                "run here. Supported: x86_64 and aarch64 (a Raspberry Pi 3, 4 or 5 with a 64-bit OS:" \
                "Raspberry Pi OS 64-bit or Ubuntu arm64)" ;;
        *) die "unsupported CPU architecture $machine: PyTorch, and so fedmq, runs on x86_64 and aarch64" ;;
    esac
    command -v python3 >/dev/null || die "python3 is required (Debian/Ubuntu: apt-get install python3 python3-venv)"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "python3 is $(python3 -V 2>&1 | cut -d' ' -f2); fedmq needs Python 3.11 or newer (Debian 12, Ubuntu 24.04, Raspberry Pi OS bookworm)"
    if [ -z "${INSTALL_SLAVE_MACHINE:-}" ]; then
        bits=$(python3 -c 'import struct; print(struct.calcsize("P") * 8)')
        [ "$bits" = 64 ] || die "the CPU is $machine but this system is 32-bit ($bits-bit Python, e.g. a 32-bit" \
            "Raspberry Pi OS on a 64-bit kernel): PyTorch has no 32-bit wheels; install a 64-bit OS"
    fi
}

fedmq_gid() {
    if [ -z "$root" ]; then
        getent group fedmq | cut -d: -f3
    elif [ -f "$root/etc/group" ]; then
        awk -F: '$1 == "fedmq" { print $3 }' "$root/etc/group"
    fi
}

# The data as the service reads it: a throw-away user in group fedmq.
data_readable_by_service() {
    local gid
    gid=$(fedmq_gid)
    if [ -n "$gid" ]; then
        setpriv --reuid=65534 --regid=65534 --groups="$gid" -- test -r "$1"
    else
        setpriv --reuid=65534 --regid=65534 --clear-groups -- test -r "$1"
    fi
}

need_sklearn=no
check_data() {
    case $data in
        *[\"\\]*) die "--data must not contain quotes or backslashes" ;;
        reference:*)
            [[ $data =~ ^reference:(test|([0-9]+)(/([0-9]+))?)$ ]] \
                || die "--data '$data': expected reference:I, reference:I/N (0 <= I < N) or reference:test"
            if [ -n "${BASH_REMATCH[2]}" ] && [ "${BASH_REMATCH[2]}" -ge "${BASH_REMATCH[4]:-8}" ]; then
                die "--data '$data': shard ${BASH_REMATCH[2]} of ${BASH_REMATCH[4]:-8} does not exist (0 <= I < N)"
            fi
            need_sklearn=yes
            say "--data $data: the bundled digits demo data (scikit-learn is installed for it)" ;;
        *.npz|*.csv|*.NPZ|*.CSV)
            data=$(realpath -m "$data")
            case $data/ in
                /home/*|/root/*|/run/user/*)
                    die "--data $data: the service cannot see /home, /root or /run/user (ProtectHome=yes);" \
                        "move the data, e.g. to /srv/fedmq/" ;;
            esac
            [ -e "$data" ] || die "--data $data does not exist"
            [ -f "$data" ] || die "--data $data is not a file"
            [ -r "$data" ] || die "--data $data is not readable"
            ;;
        *:*)
            [[ $data =~ ^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$ ]] \
                || die "--data '$data': expected a .npz or .csv file, module:function or reference:I/N"
            say "--data $data: an entry point; install its package into $PREFIX ($PREFIX/bin/pip install ...)" ;;
        *) die "--data '$data': expected a .npz or .csv file, module:function or reference:I/N" ;;
    esac
}

check_data_access() {  # after the group exists
    case $data in *.npz|*.csv|*.NPZ|*.CSV) ;; *) return 0 ;; esac
    if [ "$(id -u)" -ne 0 ] || ! command -v setpriv >/dev/null; then
        say "cannot check that the service may read $data (needs root and setpriv)"
        return 0
    fi
    data_readable_by_service "$data" && return 0
    local fix="chgrp fedmq '$data' && chmod g+r '$data', and let others (or group fedmq) enter every directory above it (chmod o+x DIR)"
    if [ $dry_run = yes ] && [ -z "$(fedmq_gid)" ]; then
        say "warning: --data $data is not readable by others; once group fedmq exists: $fix"
        return 0
    fi
    die "--data $data is not readable by the service, which runs as a throw-away user in group fedmq: $fix"
}

check_master_key() {  # FILE
    [ -r "$1" ] || die "cannot read --master-key $1"
    ! grep -q 'PRIVATE KEY' "$1" || die "--master-key $1 is a private key: give the master's public key (master.pub)"
    grep -q -- '-----BEGIN PUBLIC KEY-----' "$1" || die "--master-key $1 is not a PEM public key (master.pub)"
}

# ------------------------------------------------------------------ the installed config

prev() {  # KEY: its value in the config this script wrote before (empty if none)
    [ -f "$config" ] || return 0
    sed -n "s/^$1 = \"\{0,1\}\([^\"]*\)\"\{0,1\}\$/\1/p" "$config" | head -n 1
}

render_config() {
    echo "# fedmq slave $id, $MARKER: running it again rewrites this"
    echo "# file (the previous one is kept as $id.toml.old). Secrets come from systemd"
    echo "# credentials (LoadCredential in fedmq-slave@.service), not from this file."
    echo "[slave]"
    echo "id = \"$id\""
    echo "job = \"$job\""
    echo "key = \"$credentials/signing.key\""
    echo "master_key = \"$pinned\""
    echo "master_name = \"$master_name\""
    echo "data = \"$data\""
    echo "state_dir = \"$STATE/$id\""
    echo
    echo "[broker]"
    echo "host = \"$host\""
    echo "port = $port"
    echo "username = \"$id@$job\""
    echo "password_file = \"$credentials/broker-password\""
    if [ -n "$ca" ]; then
        echo "tls_ca = \"$ca_dest\""
    elif [ "$tls" = yes ]; then
        echo "tls = true"
    fi
}

# ------------------------------------------------------------------ uninstall

uninstall() {
    if [ $purge = yes ]; then
        step "Removing fedmq-slave@$id with its key, password and state (--purge)"
    else
        step "Removing fedmq-slave@$id (its key, password and state are kept)"
    fi
    if [ $systemd = yes ] && [ -e "$UNIT_DIR/fedmq-slave@.service" ]; then
        systemd_unit disable "$unit"
    fi
    local f others
    for f in "$config" "$config.old" "$pinned" "$ca_dest"; do
        [ ! -e "$f" ] || run rm -f "$f"
    done
    if [ $purge = yes ]; then
        for f in "$ETC/keys/$id.key" "$ETC/keys/$id.pub" "$secret" "$STATE/$id" "$root/var/lib/private/fedmq/$id"; do
            if [ -e "$f" ] || [ -L "$f" ]; then
                run rm -rf "$f"
            fi
        done
    else
        say "kept: $ETC/keys/$id.key, $secret and the state in $STATE/$id (--purge deletes them)"
    fi
    others=$(find "$ETC" -maxdepth 1 -name '*.toml' ! -name "$id.toml" -printf '%f ' 2>/dev/null || true)
    if [ -n "$others" ]; then
        say "kept $PREFIX and the unit: still used by $others"
    else
        if [ -e "$UNIT_DIR/fedmq-slave@.service" ]; then
            run rm -f "$UNIT_DIR/fedmq-slave@.service"
            systemd_unit daemon-reload
        fi
        [ ! -e "$PREFIX" ] || run rm -rf "$PREFIX"
        if [ $purge = yes ]; then
            for f in "$ETC/keys" "$ETC" "$STATE"; do
                [ ! -d "$f" ] || [ -n "$(ls -A "$f")" ] || run rmdir "$f"
            done
        fi
    fi
    say "group fedmq is left in place (delete it with groupdel fedmq if nothing else uses it)"
    [ $dry_run = no ] || say "dry run: nothing was changed"
}

# ------------------------------------------------------------------ main

check_id "$id" --id
if [ $dry_run = no ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (it installs a system service); --dry-run shows what it would do"
fi
if [ $systemd = yes ] && [ $dry_run = no ] && ! command -v systemctl >/dev/null; then
    die "systemd is required (or --no-systemd)"
fi
if [ $uninstall = yes ]; then
    uninstall
    exit 0
fi
[ $purge = no ] || die "--purge goes with --uninstall"

# Re-run: what is not given comes from the config this script wrote before.
if [ -f "$config" ]; then
    if ! head -n 1 "$config" | grep -q "$MARKER"; then
        die "$config was not $MARKER (its first line says so when it was):" \
            "not overwriting it. Edit it by hand, or move it away and run this again."
    fi
    say "updating the existing $config: options not given are kept from it"
    job=${job:-$(prev job)}
    master_name=${master_name:-$(prev master_name)}
    data=${data:-$(prev data)}
    master_key=${master_key:-$(prev master_key)}
    if [ -z "$tls" ]; then
        ca=$(prev tls_ca)
        tls=$([ -n "$ca" ] || [ "$(prev tls)" = true ] && echo yes || echo no)
    fi
    if [ -z "$broker" ]; then
        broker=$(prev host):$(prev port)
    fi
fi
master_name=${master_name:-master}
tls=${tls:-no}
missing=''
for opt in job broker master_key data; do
    [ -n "${!opt}" ] || missing="$missing --${opt//_/-}"
done
[ -z "$missing" ] || die "missing$missing (no earlier $config to take them from); see --help"
check_id "$job" --job
check_id "$master_name" --master-name

host=${broker%:*}
port=${broker##*:}
if [ "$host" = "$broker" ]; then
    port=$([ "$tls" = yes ] && echo 8883 || echo 1883)
fi
[[ -n $host && $host != *[\"\\\ ]* && $port =~ ^[0-9]+$ ]] || die "--broker '$broker': expected HOST or HOST:PORT"

check_platform
check_master_key "$master_key"
[ -z "$ca" ] || [ -r "$ca" ] || die "cannot read --ca $ca"
[ -z "$password_file" ] || [ -r "$password_file" ] || die "cannot read --password-file $password_file"
check_data
[ "$tls" = yes ] || say "warning: no --ca/--tls, the broker connection is not encrypted"
if [ $pip = no ] && [ ! -x "$PREFIX/bin/fedmq" ] && [ $dry_run = no ]; then
    die "--skip-pip: there is no $PREFIX/bin/fedmq to use"
fi

step "Group fedmq (the service's supplementary group: it may read the training data)"
if [ -n "$(fedmq_gid)" ]; then
    say "group fedmq exists"
elif [ -n "$root" ]; then
    run groupadd --system --prefix "$root" fedmq
else
    run groupadd --system fedmq
fi
check_data_access

step "Python environment in $PREFIX"
if [ $pip = yes ]; then
    t0=$SECONDS
    run python3 -m venv "$PREFIX" || die "python3 -m venv failed (Debian/Ubuntu: apt-get install python3-venv)"
    say "pip: upgrading pip itself"
    run "$PREFIX/bin/pip" install --quiet --upgrade pip
    say "pip: $torch_spec, CPU build from $torch_index: a download of ~190 MB, ~860 MB"
    say "     on disk with its dependencies (x86_64); minutes on a Raspberry Pi (pip shows its progress)"
    run "$PREFIX/bin/pip" install --progress-bar on "$torch_spec" --index-url "$torch_index"
    extra=()
    if [ $need_sklearn = yes ]; then
        extra=(scikit-learn)
    fi
    say "pip: fedmq from $source_spec ${extra[*]:+and ${extra[*]} }with its dependencies (paho-mqtt, cbor2, cryptography, click, numpy)"
    run "$PREFIX/bin/pip" install --upgrade --progress-bar on "$source_spec" "${extra[@]}"
    [ $dry_run = yes ] || say "Python environment ready in $(( (SECONDS - t0) / 60 )) min $(( (SECONDS - t0) % 60 )) s"
else
    say "--skip-pip: using $PREFIX as it is"
fi
run install -d -m 0755 "$PREFIX/share"
docs=$(dirname "$here")/docs/OPERATIONS.md
if [ -f "$docs" ]; then
    run install -m 0644 "$docs" "$PREFIX/share/OPERATIONS.md"
fi
if [ -x "$PREFIX/bin/fedmq" ]; then
    kid=$("$PREFIX/bin/fedmq" keys show "$master_key") || die "--master-key $master_key: not an Ed25519 public key"
    say "pinned master key: key id $kid, signing as '$master_name'"
fi

step "Keys and configuration in $ETC"
run install -d -m 0755 "$ETC"
run install -d -m 0700 "$ETC/keys"
if [ -f "$ETC/keys/$id.key" ]; then
    say "keeping the existing key $ETC/keys/$id.key"
else
    run "$PREFIX/bin/fedmq" keys generate "$id" --dir "$ETC/keys"
fi
# Public material: the service reads these itself, as a throw-away user.
copy_file "$master_key" "$pinned" 0644
if [ -n "$ca" ]; then
    copy_file "$ca" "$ca_dest" 0644
elif [ -e "$ca_dest" ]; then
    run rm -f "$ca_dest"
fi
generated_password=no
if [ -n "$password_file" ]; then
    copy_file "$password_file" "$secret" 0600
elif [ ! -f "$secret" ]; then
    generate_password "$secret"
    generated_password=yes
fi
new_config=$(render_config)
if [ ! -f "$config" ]; then
    write_file "$config" 0644 <<<"$new_config"
elif [ "$(cat "$config")" = "$new_config" ]; then
    say "$config is unchanged"
else
    old_user=$(prev username)
    say "changes to $config:"
    diff -u --label "$config (before)" --label "$config (now)" "$config" - <<<"$new_config" || true
    run cp -p "$config" "$config.old"
    write_file "$config" 0644 <<<"$new_config"
    if [ "$old_user" != "$id@$job" ]; then
        say "the broker user is now $id@$job (was ${old_user:-none}): add it on the broker (below)"
    fi
fi

if [ $systemd = yes ]; then
    step "systemd unit $unit"
    run install -d -m 0755 "$UNIT_DIR"
    run install -m 0644 "$here/fedmq-slave@.service" "$UNIT_DIR/fedmq-slave@.service"
    systemd_unit daemon-reload
    systemd_unit enable "$unit"
    if [ $start = yes ]; then
        # also what applies a new config or a new fedmq version to a running slave
        systemd_unit restart "$unit"
    else
        say "not started (--no-start): systemctl restart $unit"
    fi
fi

if [ $dry_run = yes ]; then
    printf '\nDry run: nothing was changed.\n'
    exit 0
fi
if [ $systemd = no ]; then
    say "no systemd unit (--no-systemd): run, and after every change restart,"
    say "  $PREFIX/bin/fedmq slave run --config $config"
    say "  as an unprivileged user that can read $credentials/ (key and password) and write $STATE/$id"
fi
cat <<EOF

Done. Still to do elsewhere:
  1. On the master: enrol this slave by copying its public key
       $ETC/keys/$id.pub   to the master's enrollment directory (/etc/fedmq/slaves/).
  2. On the broker: account $id@$job needs the password in $secret and its ACL
     rules. Unless that password came from fedmq broker config (--password-file),
     copy it over securely to passwords/$id@$job in the job's broker directory,
     run fedmq broker config --update with $id in --slaves, re-install fedmq.passwd
     and fedmq.acl, then: systemctl reload mosquitto (docs/OPERATIONS.md, section 1)
  3. Let the service read the data: chgrp -R fedmq DATA && chmod -R g+rX DATA
     (data under /home is hidden from the service).
Watch it:  journalctl -fu $unit
EOF
if [ $generated_password = yes ]; then
    echo "(a new broker password was generated in $secret)"
fi
