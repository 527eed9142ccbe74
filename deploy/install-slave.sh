#!/usr/bin/env bash
# Install a fedmq slave on this device as the systemd service fedmq-slave@ID.
#
#   sudo deploy/install-slave.sh --id ID --job JOB --broker HOST[:PORT] \
#        --master-key master.pub --data DATA [options]
#
#   --id ID               slave id (A-Z a-z 0-9 _ . -); broker account and MQTT client id: ID@JOB
#   --job JOB             job id to serve
#   --broker HOST[:PORT]  the Mosquitto broker (port 8883 with TLS, else 1883)
#   --master-key FILE     the master's public key (master.pub), pinned by the slave
#   --data DATA           the local training data (a path, or a source such as
#                         reference:0/8 for the bundled digits demo data)
#   --ca FILE             CA certificate of the broker (certs/ca.crt of fedmq broker config);
#                         turns TLS on. --tls: TLS with the system's CAs instead.
#   --password-file FILE  broker password of account ID@JOB (passwords/ID@JOB of fedmq broker
#                         config); without it one is generated
#   --source SPEC         what pip installs as fedmq (default: this source tree)
#   --torch-index URL     pip index for torch (default: PyTorch's CPU-only wheels)
#   --no-start            install and enable, but do not start the service
#
# Result: a venv in /opt/fedmq, the slave key /etc/fedmq/keys/ID.key (root-only;
# systemd hands it to the service), /etc/fedmq/ID.toml (never overwritten), and the
# service enabled. Run it again to upgrade fedmq in place. See docs/OPERATIONS.md.
set -euo pipefail

PREFIX=/opt/fedmq
ETC=/etc/fedmq
UNIT_DIR=/etc/systemd/system
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
    sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}
die() {
    echo "install-slave: $*" >&2
    exit 1
}

id='' job='' broker='' master_key='' data='' ca='' tls=no password_file='' start=yes
source_spec=$(dirname "$here")
torch_index=https://download.pytorch.org/whl/cpu
while [ $# -gt 0 ]; do
    case $1 in
        --id) id=$2; shift 2 ;;
        --job) job=$2; shift 2 ;;
        --broker) broker=$2; shift 2 ;;
        --master-key) master_key=$2; shift 2 ;;
        --data) data=$2; shift 2 ;;
        --ca) ca=$2; tls=yes; shift 2 ;;
        --tls) tls=yes; shift ;;
        --password-file) password_file=$2; shift 2 ;;
        --source) source_spec=$2; shift 2 ;;
        --torch-index) torch_index=$2; shift 2 ;;
        --no-start) start=no; shift ;;
        -h|--help) usage ;;
        *) echo "install-slave: unknown option $1" >&2; usage ;;
    esac
done
if [ -z "$id" ] || [ -z "$job" ] || [ -z "$broker" ] || [ -z "$master_key" ] || [ -z "$data" ]; then
    usage
fi
name_re='^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'
[[ $id =~ $name_re ]] || die "--id '$id': use 1-64 letters, digits, '_', '.', '-'"
[[ $job =~ $name_re ]] || die "--job '$job': use 1-64 letters, digits, '_', '.', '-'"
[[ $data != *[\"\\]* ]] || die "--data must not contain quotes or backslashes"
[ "$(id -u)" -eq 0 ] || die "run as root (it installs a system service)"
[ -r "$master_key" ] || die "cannot read --master-key $master_key"
[ -z "$ca" ] || [ -r "$ca" ] || die "cannot read --ca $ca"
[ -z "$password_file" ] || [ -r "$password_file" ] || die "cannot read --password-file $password_file"
command -v systemctl >/dev/null || die "systemd is required"

host=${broker%:*}
port=${broker##*:}
if [ "$host" = "$broker" ]; then
    port=$([ $tls = yes ] && echo 8883 || echo 1883)
fi
[[ $port =~ ^[0-9]+$ ]] || die "--broker '$broker': expected HOST or HOST:PORT"
[ $tls = yes ] || echo "install-slave: warning: no --ca/--tls, the broker connection is not encrypted" >&2

echo "== Python environment in $PREFIX"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "python3 >= 3.10 is required"
python3 -m venv "$PREFIX" || die "python3 -m venv failed (Debian/Ubuntu: apt-get install python3-venv)"
"$PREFIX/bin/pip" install --quiet --upgrade pip
"$PREFIX/bin/pip" install --quiet torch --index-url "$torch_index"
"$PREFIX/bin/pip" install --quiet --upgrade "$source_spec"
install -d -m 0755 "$PREFIX/share"
if [ -f "$here/../docs/OPERATIONS.md" ]; then
    install -m 0644 "$here/../docs/OPERATIONS.md" "$PREFIX/share/OPERATIONS.md"
fi

echo "== Keys and configuration in $ETC"
getent group fedmq >/dev/null || groupadd --system fedmq
install -d -m 0755 "$ETC"
install -d -m 0700 "$ETC/keys"
if [ ! -f "$ETC/keys/$id.key" ]; then
    "$PREFIX/bin/fedmq" keys generate "$id" --dir "$ETC/keys"
fi
install -m 0644 "$master_key" "$ETC/keys/master.pub"
secret=$ETC/keys/$id.broker-password
if [ -n "$password_file" ]; then
    install -m 0600 "$password_file" "$secret"
elif [ ! -f "$secret" ]; then
    (umask 077 && head -c 24 /dev/urandom | base64 | tr -d '/+=\n' > "$secret")
    generated_password=yes
fi
if [ -n "$ca" ]; then
    install -m 0644 "$ca" "$ETC/ca.crt"
fi

config=$ETC/$id.toml
credentials=/run/credentials/fedmq-slave@$id.service
if [ -f "$config" ]; then
    echo "keeping existing $config"
else
    {
        echo "# fedmq slave $id, written by install-slave.sh. Secrets come from systemd"
        echo "# credentials (LoadCredential in fedmq-slave@.service), not from this file."
        echo "[slave]"
        echo "id = \"$id\""
        echo "job = \"$job\""
        echo "key = \"$credentials/signing.key\""
        echo "master_key = \"$ETC/keys/master.pub\""
        echo "data = \"$data\""
        echo "state_dir = \"/var/lib/fedmq/$id\""
        echo
        echo "[broker]"
        echo "host = \"$host\""
        echo "port = $port"
        echo "username = \"$id@$job\""
        echo "password_file = \"$credentials/broker-password\""
        if [ -n "$ca" ]; then
            echo "tls_ca = \"$ETC/ca.crt\""
        elif [ $tls = yes ]; then
            echo "tls = true"
        fi
    } > "$config"
    chmod 0644 "$config"
    echo "wrote $config"
fi

echo "== systemd unit fedmq-slave@$id"
install -m 0644 "$here/fedmq-slave@.service" "$UNIT_DIR/fedmq-slave@.service"
systemctl daemon-reload
if [ $start = yes ]; then
    systemctl enable --now "fedmq-slave@$id.service"
else
    systemctl enable "fedmq-slave@$id.service"
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
Watch it:  journalctl -fu fedmq-slave@$id
EOF
if [ "${generated_password:-no}" = yes ]; then
    echo "(a new broker password was generated in $secret)"
fi
