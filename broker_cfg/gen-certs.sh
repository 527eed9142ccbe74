#!/usr/bin/env bash
# Issue the TLS certificates for a fedmq broker and its clients with openssl.
#
#   gen-certs.sh OUT_DIR SERVER_NAME [CLIENT_NAME ...]
#
# OUT_DIR      gets ca.crt/ca.key (created once, then reused), server.crt/server.key
#              for the broker, and NAME.crt/NAME.key per client.
# SERVER_NAME  the host name (or IP address) clients use to reach the broker; it is
#              put in the certificate's subjectAltName, which clients verify.
# CLIENT_NAME  a slave id, fedmq-master or fedmq-monitor: the certificate CN, which
#              becomes the MQTT username with `use_identity_as_username true`.
#
# Existing files are never overwritten, so run it again with new client names to
# enrol more devices with the same CA. Keep ca.key offline: whoever has it can mint
# certificates the broker trusts. Environment: DAYS (leaf validity, default 825).
set -euo pipefail

if [ $# -lt 2 ]; then
    sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
fi
out=$1
server=$2
shift 2
days=${DAYS:-825}

mkdir -p "$out"
cd "$out"

# Private keys are readable by their owner only; certificates by everyone.
new_key() {  # FILE
    (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1")
}

if [ ! -f ca.key ]; then
    new_key ca.key
    openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=fedmq CA" \
        -out ca.crt -config <(printf '%s\n' '[req]' 'distinguished_name=dn' '[dn]') \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash"
    echo "created CA: $out/ca.crt"
fi

issue() {  # NAME CN EXTENSIONS...
    local name=$1 cn=$2
    shift 2
    if [ -f "$name.crt" ]; then
        echo "kept existing $out/$name.crt"
        return
    fi
    [ -f "$name.key" ] || new_key "$name.key"
    openssl req -new -key "$name.key" -subj "/CN=$cn" -out "$name.csr" \
        -config <(printf '%s\n' '[req]' 'distinguished_name=dn' '[dn]')
    local log
    if ! log=$(openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
        -sha256 -days "$days" -out "$name.crt" -extfile <(printf '%s\n' \
            "basicConstraints=critical,CA:FALSE" \
            "keyUsage=critical,digitalSignature" \
            "subjectKeyIdentifier=hash" \
            "authorityKeyIdentifier=keyid" \
            "$@") 2>&1); then
        echo "$log" >&2
        exit 1
    fi
    rm -f "$name.csr"
    echo "issued $out/$name.crt (CN=$cn)"
}

if [[ $server =~ ^[0-9.]+$ || $server == *:* ]]; then
    san="IP:$server"
else
    san="DNS:$server"
fi
issue server "$server" "extendedKeyUsage=serverAuth" "subjectAltName=$san"

for client in "$@"; do
    if [[ ! $client =~ ^[A-Za-z0-9._-]+$ || $client == ca || $client == server ]]; then
        echo "skipping client name '$client': use letters, digits, '.', '_' and '-'," \
             "and not 'ca' or 'server'" >&2
        continue
    fi
    issue "$client" "$client" "extendedKeyUsage=clientAuth"
done
