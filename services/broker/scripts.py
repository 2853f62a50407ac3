"""Lua scripts run inside Redis, so each registry change is one atomic step.

Keys (name validated by services.common.names; sha256 is hex):
  ll:a:{name}             hash: epoch (publisher fence), latest (last version assigned)
  ll:a:{name}:versions    zset of live versions (score = version)
  ll:a:{name}:v:{n}       JSON record of version n
  ll:a:{name}:pinned      set of pinned versions
  ll:a:{name}:events      stream, entry id "{version}-0", field record = JSON; the newest
                          events_maxlen entries (watch fills a gap past them from :versions)
  ll:a:{name}:pubids      zset publish id -> version committed (idempotent retries): the newest
                          publish_ids_kept ids, expiring publish_id_ttl_s after the last publish
  ll:blob:{sha256}        adapter_model.safetensors bytes (shared by versions with equal bytes)
  ll:blobref:{sha256}     number of live versions that reference the blob
  ll:staging:{upload}     bytes of an upload in progress, with TTL (never visible)
  ll:names                set of adapter names
"""

# Drops versions beyond the newest `keep` that are not pinned, and blobs no version uses.
_RETAIN = """
local function retain(versions_key, pinned_key, rec_prefix, keep)
  local old = redis.call('ZRANGE', versions_key, 0, -(keep + 1))
  local dropped = 0
  for _, v in ipairs(old) do
    if redis.call('SISMEMBER', pinned_key, v) == 0 then
      local js = redis.call('GET', rec_prefix .. v)
      redis.call('DEL', rec_prefix .. v)
      redis.call('ZREM', versions_key, v)
      if js then
        local sha = cjson.decode(js)['sha256']
        if redis.call('DECR', 'll:blobref:' .. sha) <= 0 then
          redis.call('DEL', 'll:blob:' .. sha, 'll:blobref:' .. sha)
        end
      end
      dropped = dropped + 1
    end
  end
  return dropped
end
"""

# KEYS: meta, versions, events, staging, blob, blobref, names, pubids, pinned
# ARGV: epoch, size, record json, name, record prefix, keep_last, publish id ('' = none),
#       stream maxlen, publish ids kept, publish id ttl
# What a commit leaves beyond the retained versions is bounded: the stream is trimmed to exactly
# maxlen entries and the publish ids to the newest `kept`, whatever the number of publishes.
COMMIT = _RETAIN + """
local cur = redis.call('HGET', KEYS[1], 'epoch')
if (not cur) or cur ~= ARGV[1] then
  redis.call('DEL', KEYS[4])
  return {'STALE', cur or '0'}
end
if ARGV[7] ~= '' then
  local prev = redis.call('ZSCORE', KEYS[8], ARGV[7])
  if prev then
    redis.call('DEL', KEYS[4])
    return {'DUP', redis.call('GET', ARGV[5] .. prev) or '', prev}
  end
end
local len = redis.call('STRLEN', KEYS[4])
if len ~= tonumber(ARGV[2]) then
  redis.call('DEL', KEYS[4])
  return {'SIZE', tostring(len)}
end
local v = redis.call('HINCRBY', KEYS[1], 'latest', 1)
if redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('DEL', KEYS[4])
else
  redis.call('RENAME', KEYS[4], KEYS[5])
  redis.call('PERSIST', KEYS[5])
end
redis.call('INCR', KEYS[6])
local t = redis.call('TIME')
local rec = cjson.decode(ARGV[3])
rec['version'] = v
rec['created_at_ms'] = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
rec['publisher_epoch'] = tonumber(ARGV[1])
local js = cjson.encode(rec)
redis.call('SET', ARGV[5] .. v, js)
redis.call('ZADD', KEYS[2], v, v)
redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[8], v .. '-0', 'record', js)
redis.call('SADD', KEYS[7], ARGV[4])
if ARGV[7] ~= '' then
  redis.call('ZADD', KEYS[8], v, ARGV[7])
  redis.call('ZREMRANGEBYRANK', KEYS[8], 0, -(tonumber(ARGV[9]) + 1))
  redis.call('EXPIRE', KEYS[8], ARGV[10])
end
retain(KEYS[2], KEYS[9], ARGV[5], tonumber(ARGV[6]))
return {'OK', js, tostring(v)}
"""

# KEYS: meta. Returns {epoch, latest}.
ACQUIRE = """
local e = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
local latest = redis.call('HGET', KEYS[1], 'latest') or '0'
return {e, tonumber(latest)}
"""

# KEYS: versions, pinned; ARGV: version, pin(1)/unpin(0), record prefix, keep_last
PIN = _RETAIN + """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == false then
  return 0
end
if ARGV[2] == '1' then
  redis.call('SADD', KEYS[2], ARGV[1])
else
  redis.call('SREM', KEYS[2], ARGV[1])
  retain(KEYS[1], KEYS[2], ARGV[3], tonumber(ARGV[4]))
end
return 1
"""
