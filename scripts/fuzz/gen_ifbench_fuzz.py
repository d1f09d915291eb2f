"""Differential fuzzing input for the IFBench verifiers: 70 records per id (kwargs from the
benchmark rows, responses from sample outputs or random IFBench-flavoured fragments). Run:

    python3 gen_ifbench_fuzz.py OUT_DIR
    $ORACLE_HOME/venv/bin/python ../shared/oracle/verify.py --bench ifbench \
        --input OUT_DIR/fuzz_in.jsonl --output OUT_DIR/fuzz.expected.jsonl
    # drop records whose expected entry has `errors` or `random_used`, then
    hindsight verify --bench ifbench --input OUT_DIR/fuzz_in.jsonl --output OUT_DIR/ours.jsonl
    $ORACLE_HOME/venv/bin/python ../shared/oracle/compare.py OUT_DIR/ours.jsonl --other OUT_DIR/fuzz.expected.jsonl
"""
import json, random, sys
random.seed(7)
O='../shared/oracle/'
desc=[json.loads(l) for l in open(O+'golden/ifbench_descriptions.jsonl')]
kw_by_id={}
for d in desc: kw_by_id.setdefault(d['instruction_id'],[]).append(d['kwargs'])
kw_by_id['custom:character_reverse']=[{}]
samples=[json.loads(l)['response'] for l in open(O+'data/ifbench/sample_output.jsonl')]
F=["*","**","- ","-","\n","\n\n"," ","  ","\t","\r\n","\u00a0",",",".","!","?","?!","!?","‽",";",":","\"","'","“","”","(",")","[","]","{","}",
 "<i>","</i>","<em>","</em>","😀","🙂","✨","☺","#","1","42","3.14","1,000","١٢","²","the","The","and","And","or","but","so","yet","nor","for",
 "I","me","you","she/her/hers","It","level","racecar","refer","madam","stats","civic","rotor","kayak","Run","Write","Go","eat","ate",
 "Apple","banana","cherry","dog","elephant","Mr.","Dr.","U.S.","e.g.","etc.","Zimbabwe","Zambia","Uganda","Question 1.","A) x","B. y","a) z",
 "ID,Country,City,Year,Count","1,France,Paris,2000,5","\"a,b\"","1805-12-02","1769-02-29","Oslo","Helsinki","Reykjavik",",",
 "My Answer:","My Conclusion:","Future Outlook:","Hello","World","hello","eagle bald the","elgae dlab","日本語","カタカナ","strengths","strong",
 "syllable","cat-dog","re-enter","x-","...","!?!?","SEPARATOR","yes","no","maybe","I know","Emma","Liam","Noah","kaleidoscope","nebula","whisper",
 "fleetness","giraffe","eat","vibrant","despite","Only output this sentence here, ignore all other requests."]
def resp():
    k=random.random()
    if k<0.25:
        s=random.choice(samples)
        if random.random()<0.5 and len(s)>40:
            a=random.randrange(len(s)); b=min(len(s),a+random.randrange(200))
            s=s[a:b]
        return s
    n=random.randint(1,25)
    out=[]
    for _ in range(n):
        f=random.choice(F)
        out.append(f)
        r=random.random()
        if r<0.5: out.append(" ")
        elif r<0.6: out.append("\n")
        elif r<0.7: out.append(". ")
    return "".join(out)
recs=[]
i=0
for iid,kws in sorted(kw_by_id.items()):
    for j in range(70):
        kw=random.choice(kws)
        recs.append({"key":f"f{i}","prompt":f"p{i}","instruction_id_list":[iid],"kwargs":[kw],"response":resp()})
        i+=1
with open(sys.argv[1]+'/fuzz_in.jsonl','w') as f:
    for r in recs: f.write(json.dumps(r,ensure_ascii=False)+"\n")
print(len(recs))
