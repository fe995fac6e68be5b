"""The Lua scripts of the Redis store (``shared_state.redis_store``; its docstring has the key layout).

Each runs atomically in Redis, so replicas flushing at once lose no counts and never push a namespace past
its bounds.
"""

# Strict: ids are 1-10 decimal digits; numbers plain decimal/exponent digits (no hex, spaces, inf or nan).
PARSE_LUA = r"""
local function is_id(f) return #f <= 10 and string.match(f, '^%d+$') ~= nil end
local function number(s)
  if #s > 40 or not string.match(s, '^[%d%.eE%+%-]+$') then return nil end
  local v = tonumber(s)
  if v == nil or v ~= v or v == math.huge or v == -math.huge then return nil end
  return v
end
"""

# KEYS: the rows index, then context rows. ARGV: cap, top_k, half_life_s (0: none), min_weight, ttl_s
# (0: none), max_rows (0: none), the row key prefix, then per row its (successor id, delta) pairs as
# little-endian doubles. Returns {applied, rejected keys, rejected fields, rows evicted}.
FLUSH_LUA = r"""
local cap, top_k = tonumber(ARGV[1]), tonumber(ARGV[2])
local half_life, min_w, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local max_rows, row_prefix = tonumber(ARGV[6]), ARGV[7]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
""" + PARSE_LUA + r"""
local applied, bad_keys, bad_fields, evicted = 0, 0, 0, 0
local index = KEYS[1]
local index_kind = redis.call('TYPE', index).ok
local indexed = index_kind == 'zset' or index_kind == 'none'
if not indexed then bad_keys = bad_keys + 1 end
-- Only our own row keys are ever deleted through the index, whatever else a foreign writer put in it.
local function ours(m)
  return string.sub(m, 1, #row_prefix) == row_prefix and string.match(string.sub(m, #row_prefix + 1), '^%d+:%d+$') ~= nil
end
for i = 2, #KEYS do
  local key, deltas = KEYS[i], ARGV[6 + i]
  local kind = redis.call('TYPE', key).ok
  if kind ~= 'hash' and kind ~= 'none' then
    bad_keys = bad_keys + 1
  else
    local flat = redis.call('HGETALL', key)
    local w, foreign, stamp = {}, 0, now
    for j = 1, #flat, 2 do
      local f, v = flat[j], number(flat[j + 1])
      if f == '_t' and v then stamp = math.min(v, now)
      elseif is_id(f) and v and v >= 0 then w[f] = math.min(v, cap)
      else bad_fields = bad_fields + 1; if not is_id(f) then foreign = foreign + 1 end end
    end
    if half_life > 0 and now - stamp >= 0.01 * half_life then
      local factor = 0.5 ^ ((now - stamp) / half_life)
      for c, v in pairs(w) do w[c] = v * factor end
      stamp = now
    end
    for j = 1, #deltas, 16 do
      local id, d = struct.unpack('<dd', deltas, j)
      local c = string.format('%d', id)
      w[c] = math.max(0, math.min(cap, (w[c] or 0) + d)); applied = applied + 1
    end
    local ranked = {}
    for c, v in pairs(w) do if v > 0 and v >= min_w then ranked[#ranked + 1] = c end end
    table.sort(ranked, function(x, y) if w[x] ~= w[y] then return w[x] > w[y] end return x < y end)
    local keep, set = {}, {'_t', stamp}
    for i = 1, math.min(top_k, #ranked) do
      local c = ranked[i]; keep[c] = true; set[#set + 1] = c; set[#set + 1] = w[c]
    end
    local drop = {}
    for j = 1, #flat, 2 do
      if is_id(flat[j]) and not keep[flat[j]] then drop[#drop + 1] = flat[j] end
    end
    if #drop > 0 then redis.call('HDEL', key, unpack(drop)) end
    if #set > 2 then
      redis.call('HSET', key, unpack(set))
      if ttl > 0 then redis.call('EXPIRE', key, ttl) end
      if indexed then
        local total = 0
        for j = 4, #set, 2 do total = total + set[j] end
        -- log2(weight at stamp) + stamp / half_life: rows compare by their decayed weight at any common time.
        local score = math.log(total) / math.log(2)
        if half_life > 0 then score = score + stamp / half_life end
        redis.call('ZADD', index, score, key)
      end
    else
      if foreign == 0 then redis.call('DEL', key) else redis.call('HDEL', key, '_t') end
      if indexed then redis.call('ZREM', index, key) end
    end
  end
end
if indexed then
  for _, m in ipairs(redis.call('ZRANDMEMBER', index, 4)) do
    if not ours(m) or redis.call('EXISTS', m) == 0 then redis.call('ZREM', index, m) end
  end
  local n = redis.call('ZCARD', index)
  if max_rows > 0 and n > max_rows + math.floor(max_rows / 10) then
    local popped = redis.call('ZPOPMIN', index, n - max_rows)
    for j = 1, #popped, 2 do
      local m = popped[j]
      if ours(m) and redis.call('TYPE', m).ok == 'hash' then evicted = evicted + redis.call('DEL', m) end
    end
  end
end
return {applied, bad_keys, bad_fields, evicted}
"""

# KEYS: context rows. Returns little-endian doubles: server time, then per key
# [n, stamp, rejected fields, n x (successor id, weight)]; n = -1 for a key of another type, stamp = -1 if absent.
# Packing server-side keeps the client's parsing (and so its GIL time) to one buffer per pull.
PULL_LUA = r"""
local clock = redis.call('TIME')
local out = {struct.pack('<d', tonumber(clock[1]) + tonumber(clock[2]) / 1e6)}
""" + PARSE_LUA + r"""
for _, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key).ok
  if kind == 'hash' then
    local flat, row, n, stamp, bad = redis.call('HGETALL', key), {}, 0, -1, 0
    for j = 1, #flat, 2 do
      local f, v = flat[j], number(flat[j + 1])
      if f == '_t' and v then stamp = v
      elseif is_id(f) and v and v >= 0 then
        n = n + 1; row[n] = struct.pack('<dd', tonumber(f), v)
      else bad = bad + 1 end
    end
    out[#out + 1] = struct.pack('<ddd', n, stamp, bad) .. table.concat(row)
  elseif kind == 'none' then out[#out + 1] = struct.pack('<ddd', 0, -1, 0)
  else out[#out + 1] = struct.pack('<ddd', -1, -1, 0) end
end
return table.concat(out)
"""
