import re,collections,sys
tag=None; t=collections.defaultdict(float); n=collections.Counter()
for line in open(sys.argv[1]):
    for p,k in [('INSERT INTO messages','messages'),('SELECT count(*) FROM (SELECT','group-only'),('INSERT INTO user_minute','user_minute upsert'),('INSERT INTO um_log','um_log append'),('INSERT INTO user_rooms','user_rooms upsert'),('INSERT INTO room_minute','room_minute'),('COMMIT','commit')]:
        if line.startswith(p): tag=k
    m=re.match(r'Time: ([\d.]+) ms',line)
    if m and tag: t[tag]+=float(m.group(1)); n[tag]+=1; tag=None
for k,v in t.items(): print(f"{k:22} {v:8.0f} ms  {v/n[k]:6.1f} ms/batch  n={n[k]}")
