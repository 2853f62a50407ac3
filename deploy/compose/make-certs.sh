#!/usr/bin/env bash
# A private CA and one certificate for every loraloop service, for compose.tls.yaml (or any
# deployment): DIR/ca.pem (give to clients), DIR/server.pem + DIR/server.key (the services'),
# DIR/ca.key (keep it away from the services). The certificate names broker, learner, rollout,
# localhost and 127.0.0.1, plus any names given after DIR (e.g. a host's DNS name or IP), and
# allows server and client auth (mutual TLS). Keys are written 0600.
#
#   bash deploy/compose/make-certs.sh deploy/compose/certs [NAME|IP ...]
set -euo pipefail
if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
  exit $(( $# < 1 ? 2 : 0 ))
fi
dir=$1; shift
days=${LORALOOP_CERT_DAYS:-365}
san="DNS:broker,DNS:learner,DNS:rollout,DNS:localhost,IP:127.0.0.1"
for n in "$@"; do
  if [[ $n =~ ^[0-9.]+$ || $n == *:* ]]; then san+=",IP:$n"; else san+=",DNS:$n"; fi
done
mkdir -p "$dir"
umask 077
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
  -subj "/CN=loraloop CA" -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=loraloop" \
  -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
ext=$(mktemp)
trap 'rm -f "$ext" "$dir/server.csr" "$dir/ca.srl"' EXIT
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n' "$san" > "$ext"
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
  -days "$days" -extfile "$ext" -out "$dir/server.pem" 2>/dev/null
chmod 0644 "$dir/ca.pem" "$dir/server.pem"
echo "wrote $dir/ca.pem, $dir/server.pem, $dir/server.key (for: ${san//,/, })"
